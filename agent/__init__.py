"""scheduled-events-agent: acts on Azure Scheduled Events before they hit this VM.

The package is split one module per concept (see CONVENTIONS.md): ``events`` is the pure event
model, ``imds`` the HTTP client, ``errors`` the error tree, ``emulator`` an independent emulator
of the IMDS endpoints, and ``cli`` the only place that builds real collaborators.
"""

__version__ = "0.1.0"
