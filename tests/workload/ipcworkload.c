/*
 * SysV IPC workload for checkpoint/restore tests.
 *
 *   ipcworkload run   SHMKEY MSGKEY SEMKEY
 *       Creates one shm segment, one message queue and one semaphore set,
 *       then forks a counter child (bumps a shm counter every 50 ms) and a
 *       two-threaded idle child. Meant to be PID 1 of fresh PID+IPC+UTS
 *       namespaces so that CRIU has to dump and restore the IPC namespace.
 *
 *   ipcworkload probe SHMKEY MSGKEY SEMKEY
 *       Run inside the workload's IPC namespace; prints the observable IPC
 *       state as a single JSON line so a test can compare it across
 *       checkpoint and restore.
 *
 * SHMKEY 0 means no shared memory: the counter lives in the counter
 * child's own memory, as in a batch job sharing the host's IPC namespace
 * (which CRIU cannot dump with SysV shm attached).
 *
 * There are deliberately no signal handlers and no parent-death signal:
 * the test must see the processes exactly as CRIU leaves them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_COPY
#define MSG_COPY 040000 /* kernel value; older glibc headers omit it */
#endif

#define SHM_SIZE   4096
#define DATA_START 64
#define MTEXT_SIZE 64
#define NSEMS      3
#define MAX_PROBE_MSGS 64

/* glibc leaves the definition of this union to the caller. */
union semun {
	int val;
	struct semid_ds *buf;
	unsigned short *array;
};

/* One spare byte so a received text can always be NUL-terminated. */
struct message {
	long mtype;
	char mtext[MTEXT_SIZE + 1];
};

static _Noreturn void die(const char *what)
{
	perror(what);
	exit(2);
}

static key_t parse_key(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0') {
		fprintf(stderr, "bad key: %s\n", s);
		exit(2);
	}
	return (key_t)v;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	/* A stop/continue by CRIU may interrupt the sleep; that is harmless. */
	if (nanosleep(&ts, NULL) && errno != EINTR)
		die("nanosleep");
}

/* ---------------------------------------------------------------- run */

static void fill_pattern(unsigned char *p, size_t len)
{
	/* Fixed seed so the probe's hash is the same on every run. */
	uint32_t x = 0x6b657272;
	size_t i;

	for (i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		p[i] = (unsigned char)x;
	}
}

static _Noreturn void counter_child(volatile uint64_t *counter)
{
	printf("ready counter %d\n", (int)getpid());
	for (;;) {
		sleep_ms(50);
		printf("tick %llu pid %d\n",
		       (unsigned long long)++*counter, (int)getpid());
	}
}

static void *idle_thread(void *arg)
{
	(void)arg;
	for (;;)
		sleep_ms(100);
	return NULL;
}

static _Noreturn void threads_child(void)
{
	pthread_t t;
	int err;

	err = pthread_create(&t, NULL, idle_thread, NULL);
	if (err) {
		errno = err;
		die("pthread_create");
	}
	printf("ready threads %d\n", (int)getpid());
	for (;;)
		sleep_ms(100);
}

static _Noreturn void do_run(key_t shmkey, key_t msgkey, key_t semkey)
{
	static const struct { long type; const char *text; } msgs[] = {
		{ 1, "alpha" }, { 2, "bravo" }, { 7, "charlie" },
	};
	unsigned short vals[NSEMS] = { 7, 11, 13 };
	union semun arg = { .array = vals };
	static unsigned char private_counter[DATA_START];
	unsigned char *shm = private_counter;
	int shmid, msgid, semid;
	pid_t pid;
	size_t i;

	/* Line buffering keeps the log complete at any checkpoint moment. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	if (shmkey) {
		shmid = shmget(shmkey, SHM_SIZE, IPC_CREAT | IPC_EXCL | 0600);
		if (shmid < 0)
			die("shmget");
		shm = shmat(shmid, NULL, 0);
		if (shm == (void *)-1)
			die("shmat");
		memset(shm, 0, DATA_START);
		fill_pattern(shm + DATA_START, SHM_SIZE - DATA_START);
	}

	msgid = msgget(msgkey, IPC_CREAT | IPC_EXCL | 0600);
	if (msgid < 0)
		die("msgget");
	for (i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++) {
		struct message m = { .mtype = msgs[i].type };

		strcpy(m.mtext, msgs[i].text);
		if (msgsnd(msgid, &m, strlen(m.mtext) + 1, 0))
			die("msgsnd");
	}

	semid = semget(semkey, NSEMS, IPC_CREAT | IPC_EXCL | 0600);
	if (semid < 0)
		die("semget");
	if (semctl(semid, 0, SETALL, arg))
		die("semctl SETALL");

	printf("ready parent %d\n", (int)getpid());

	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0)
		counter_child((volatile uint64_t *)shm);

	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0)
		threads_child();

	/* The children never exit on their own, so any exit is a failure. */
	for (;;) {
		int status;

		pid = waitpid(-1, &status, 0);
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			die("waitpid");
		}
		fprintf(stderr, "child %d exited (status 0x%x)\n",
			(int)pid, status);
		exit(1);
	}
}

/* -------------------------------------------------------------- probe */

static uint64_t fnv1a64(const unsigned char *p, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	while (len--) {
		h ^= *p++;
		h *= 0x100000001b3ULL;
	}
	return h;
}

static int do_probe(key_t shmkey, key_t msgkey, key_t semkey)
{
	struct message msgs[MAX_PROBE_MSGS];
	unsigned short *vals;
	struct semid_ds ds;
	union semun arg;
	const unsigned char *shm;
	uint64_t counter = 0, sha = 0;
	int shmid = -1, msgid, semid, nmsgs;
	unsigned long i;

	if (shmkey) {
		shmid = shmget(shmkey, 0, 0);
		if (shmid < 0)
			die("shmget");
	}
	msgid = msgget(msgkey, 0);
	if (msgid < 0)
		die("msgget");
	semid = semget(semkey, 0, 0);
	if (semid < 0)
		die("semget");

	if (shmkey) {
		shm = shmat(shmid, NULL, SHM_RDONLY);
		if (shm == (void *)-1)
			die("shmat");
		memcpy(&counter, shm, sizeof(counter));
		sha = fnv1a64(shm + DATA_START, SHM_SIZE - DATA_START);
		if (shmdt(shm))
			die("shmdt");
	}

	/* MSG_COPY peeks at the n-th message, leaving the queue untouched. */
	for (nmsgs = 0; ; nmsgs++) {
		struct message m;
		ssize_t n = msgrcv(msgid, &m, MTEXT_SIZE, nmsgs,
				   IPC_NOWAIT | MSG_COPY);

		if (n < 0) {
			if (errno == ENOMSG)
				break;
			die("msgrcv MSG_COPY");
		}
		if (nmsgs >= MAX_PROBE_MSGS) {
			fprintf(stderr, "more than %d messages queued\n",
				MAX_PROBE_MSGS);
			exit(2);
		}
		m.mtext[n] = '\0';
		msgs[nmsgs] = m;
	}

	arg.buf = &ds;
	if (semctl(semid, 0, IPC_STAT, arg))
		die("semctl IPC_STAT");
	vals = calloc(ds.sem_nsems ? ds.sem_nsems : 1, sizeof(*vals));
	if (!vals)
		die("calloc");
	arg.array = vals;
	if (semctl(semid, 0, GETALL, arg))
		die("semctl GETALL");

	/* Print only after every query succeeded, so stdout is all or nothing. */
	printf("{\"shm_id\": %d, \"msg_id\": %d, \"sem_id\": %d, "
	       "\"counter\": %llu, \"data_sha\": \"%016llx\", \"messages\": [",
	       shmid, msgid, semid, (unsigned long long)counter,
	       (unsigned long long)sha);
	for (i = 0; i < (unsigned long)nmsgs; i++)
		printf("%s[%ld, \"%s\"]", i ? ", " : "",
		       msgs[i].mtype, msgs[i].mtext);
	printf("], \"sems\": [");
	for (i = 0; i < ds.sem_nsems; i++)
		printf("%s%u", i ? ", " : "", vals[i]);
	printf("]}\n");

	free(vals);
	if (fflush(stdout))
		die("stdout");
	return 0;
}

int main(int argc, char **argv)
{
	key_t shmkey, msgkey, semkey;

	if (argc != 5) {
		fprintf(stderr, "usage: %s run|probe SHMKEY MSGKEY SEMKEY\n",
			argv[0]);
		return 2;
	}
	shmkey = parse_key(argv[2]);
	msgkey = parse_key(argv[3]);
	semkey = parse_key(argv[4]);

	if (!strcmp(argv[1], "run"))
		do_run(shmkey, msgkey, semkey);
	if (!strcmp(argv[1], "probe"))
		return do_probe(shmkey, msgkey, semkey);
	fprintf(stderr, "unknown mode: %s\n", argv[1]);
	return 2;
}
