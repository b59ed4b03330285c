/* A slow disk for `make bench`: every fsync and fdatasync of the process waits SLOWSYNC_MS
 * milliseconds (5 by default) before it goes to the real disk, as on a VM disk whose flushes
 * take that long. Loaded with LD_PRELOAD into the agent only; bench/first_hook.py builds it.
 * SLOWSYNC_COUNT, when set, names a file that gets one byte per call, to count them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void wait_for_disk(void) {
    static long nanoseconds = -1;
    static int counter = -2;
    if (nanoseconds < 0) {
        const char *value = getenv("SLOWSYNC_MS");
        nanoseconds = (value != NULL ? atol(value) : 5) * 1000000L;
    }
    if (counter == -2) {
        const char *path = getenv("SLOWSYNC_COUNT");
        counter = path != NULL ? open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
    }
    if (counter >= 0) {
        (void)!write(counter, ".", 1);
    }
    struct timespec pause = {nanoseconds / 1000000000L, nanoseconds % 1000000000L};
    while (nanosleep(&pause, &pause) != 0) {
    }
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    wait_for_disk();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    wait_for_disk();
    return real(fd);
}
