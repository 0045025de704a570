/*
 * Processes in and around vfork, for the freezer tests:
 *
 *   stuckvfork          a parent that stays in vfork: its child never execs
 *                       or exits (it sleeps in pause()), so the parent waits
 *                       in the kernel, uninterruptibly (state D), until the
 *                       child is killed; then it sleeps in pause()
 *   stuckvfork clone    no vfork: a child of clone(CLONE_VM) without
 *                       CLONE_VFORK shares its parent's memory for good, and
 *                       both sleep in pause() (interruptibly, state S)
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static char stack[64 * 1024];

static int sleeper(void *unused)
{
	(void)unused;
	for (;;)
		pause();
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "clone") == 0) {
		if (clone(sleeper, stack + sizeof(stack), CLONE_VM | SIGCHLD, NULL) < 0)
			return 1;
		return sleeper(NULL);
	}
	if (vfork() == 0)
		sleeper(NULL);
	return sleeper(NULL);
}
