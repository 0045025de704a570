/*
 * A batch job that counts, for the job tests:
 *
 *   jobcount [LIMIT]
 *
 * Every 50 ms it adds one to a counter in its own memory and to one in a SysV
 * shared memory segment (and posts a SysV semaphore), checks the three agree,
 * and prints "count N" on one line (one write). With LIMIT it exits 0 after N
 * reached LIMIT. A disagreement prints "MISMATCH ..." and exits 3. Run it in a
 * fresh IPC namespace (a kerrickpt container): the segment and semaphore are
 * private keys of its own.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long limit = argc > 1 ? atol(argv[1]) : 0;
	int shm = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
	int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
	if (shm < 0 || sem < 0) {
		perror("jobcount: shmget/semget");
		return 2;
	}
	volatile long *shared = shmat(shm, NULL, 0);
	if (shared == (void *)-1) {
		perror("jobcount: shmat");
		return 2;
	}
	struct timespec tick = {0, 50 * 1000 * 1000};
	for (long count = 1;; count++) {
		struct sembuf up = {0, 1, 0};
		*shared += 1;
		if (semop(sem, &up, 1) < 0) {
			perror("jobcount: semop");
			return 2;
		}
		long posted = semctl(sem, 0, GETVAL);
		char line[128];
		int n;
		if (*shared != count || posted != count) {
			n = snprintf(line, sizeof line, "MISMATCH count %ld shm %ld sem %ld\n", count, *shared, posted);
			write(1, line, n);
			return 3;
		}
		n = snprintf(line, sizeof line, "count %ld\n", count);
		if (write(1, line, n) != n)
			return 4;
		if (limit && count >= limit)
			return 0;
		nanosleep(&tick, NULL);
	}
}
