/*
 * A parent that stays in vfork, for the freezer tests:
 *
 *   stuckvfork
 *
 * It vforks a child that never execs or exits (it sleeps in pause()), so the
 * parent waits in the kernel, uninterruptibly (state D), until it is killed.
 */
#include <unistd.h>

int main(void)
{
	if (vfork() == 0)
		for (;;)
			pause();
	return 0;
}
