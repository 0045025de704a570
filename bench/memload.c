/* The benchmark's workload: fills N MiB of anonymous memory, then idles until killed.
 *
 *   memload [--ticks PATH] [--churn PERCENT RUN_PAGES] MIB heap|mixed [FILE FILE_MIB]
 *
 * heap:  64-byte records like a program's heap (ids, pointers into one arena, small
 *        counters, a random hash, words from a small vocabulary): zstd -3 squeezes it
 *        about 4-6x, at the speed real heaps compress.
 * mixed: half-random: 1 MiB of random bytes, then 1 MiB of heap records, alternating,
 *        so half the memory cannot be compressed at all.
 *
 * With FILE, it first writes FILE_MIB MiB of the same kind of data (from another seed, so
 * it repeats nothing of the memory) to FILE: a confined container's file-system layer.
 *
 * It prints "ready mib=N kind=K sum=S" once filled. On SIGUSR1 it hashes its memory again
 * and prints "verify OK sum=S" or "verify BAD sum=S expected=E": that is how the benchmark
 * checks a restored copy.
 *
 * With --churn, on SIGUSR2 it rewrites about PERCENT% of its pages with new data of its kind, in
 * runs of RUN_PAGES pages at random page-aligned places (1: scattered pages, as a program rewriting
 * keys all over its heap dirties them), then prints "churned pages=N sum=S": S is what verify
 * expects from then on. That is how the store benchmark changes memory between snapshots.
 *
 * With --ticks, once filled it counts its wake-ups (every 10 ms) into PATH: the count as 20
 * decimal digits and a newline, rewritten in place, so the file keeps its size (CRIU checks
 * the size of a file a process holds open for writing). A counter that moves is how the
 * benchmark sees the workload running, after a restart too, without asking it to hash GiBs.
 *
 * The SIGUSR1 and SIGUSR2 handlers only set a flag (CRIU restores handlers);
 * there is no other handler, so SIGTERM/SIGKILL end it as usual, and no parent-death signal.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RECORD 64
#define STRIPE (1u << 20)
#define PAGE 4096u

static volatile sig_atomic_t verify_requested, churn_requested;

static void on_usr1(int sig) {
    (void)sig;
    verify_requested = 1;
}

static void on_usr2(int sig) {
    (void)sig;
    churn_requested = 1;
}

static uint64_t xorshift(uint64_t *state) {
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static const char *const WORDS[] = {
    "request", "session", "user_id", "payload", "timeout", "counter", "buffer",  "handler",
    "status",  "pending", "active",  "cached",  "expired", "node",    "value",   "index",
};

static void fill_heap(unsigned char *p, size_t len, uintptr_t arena, uint64_t *id, uint64_t *rng) {
    for (size_t off = 0; off + RECORD <= len; off += RECORD) {
        uint64_t r = xorshift(rng);
        uint64_t rec[RECORD / 8] = {0};
        rec[0] = (*id)++;                                   /* object id */
        rec[1] = arena + ((r >> 8) & 0xffffff) * RECORD;    /* pointer to another object */
        rec[2] = (r & 0xff) | ((uint64_t)((r >> 40) & 0x7) << 32); /* small counters */
        rec[3] = (uint32_t)(r >> 16);                       /* a hash: the entropy of a heap */
        memcpy(&rec[4], WORDS[r & 15], 8);
        memcpy(&rec[5], WORDS[(r >> 4) & 15], 8);
        memcpy(p + off, rec, RECORD);                       /* rec[6..7]: zero padding */
    }
}

static void fill_random(unsigned char *p, size_t len, uint64_t *rng) {
    for (size_t off = 0; off + 8 <= len; off += 8) {
        uint64_t r = xorshift(rng);
        memcpy(p + off, &r, 8);
    }
}

/* Stripe `index` of a region: heap records, or with mixed every other stripe random. */
static void fill_stripe(unsigned char *p, size_t len, size_t index, int mixed, uintptr_t arena, uint64_t *id,
                        uint64_t *rng) {
    if (mixed && index % 2 == 0)
        fill_random(p, len, rng);
    else
        fill_heap(p, len, arena, id, rng);
}

static int write_file(const char *path, size_t mib, int mixed) {
    unsigned char *buf = malloc(STRIPE);
    FILE *out = fopen(path, "wb");
    if (buf == NULL || out == NULL) {
        perror(path);
        return -1;
    }
    uint64_t rng = 0x2545f4914f6cdd1dULL, id = 1;
    for (size_t i = 0; i < mib; i++) {
        fill_stripe(buf, STRIPE, i, mixed, (uintptr_t)buf, &id, &rng);
        if (fwrite(buf, 1, STRIPE, out) != STRIPE) {
            perror(path);
            return -1;
        }
    }
    free(buf); /* unmapped again (malloc mmaps a block this big): the memory image is as without FILE */
    return fclose(out) == 0 ? 0 : -1;
}

/* About `percent`% of the pages of `mem` rewritten, in runs of `run` pages at random places; returns the pages. */
static size_t churn(unsigned char *mem, size_t len, unsigned percent, size_t run, int mixed, uint64_t *id,
                    uint64_t *rng) {
    size_t pages = len / PAGE, runs = pages * percent / 100 / run;
    if (run > pages)
        return 0;
    for (size_t i = 0; i < runs; i++) {
        size_t first = xorshift(rng) % (pages - run + 1);
        for (size_t page = first; page < first + run; page++)
            fill_stripe(mem + page * PAGE, PAGE, page * PAGE / STRIPE, mixed, (uintptr_t)mem, id, rng);
    }
    return runs * run;
}

/* FNV-1a over 64-bit words: fast enough for GiBs, and any lost or zeroed page changes it. */
static uint64_t checksum(const unsigned char *p, size_t len) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t off = 0; off + 8 <= len; off += 8) {
        uint64_t w;
        memcpy(&w, p + off, 8);
        h = (h ^ w) * 1099511628211ULL;
    }
    return h;
}

int main(int argc, char **argv) {
    int ticks = -1;
    unsigned churn_percent = 0;
    size_t churn_run = 1;
    if (argc > 2 && strcmp(argv[1], "--ticks") == 0) {
        ticks = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (ticks < 0) {
            perror(argv[2]);
            return 1;
        }
        argc -= 2;
        argv += 2;
    }
    if (argc > 3 && strcmp(argv[1], "--churn") == 0) {
        churn_percent = (unsigned)strtoul(argv[2], NULL, 10);
        churn_run = (size_t)strtoull(argv[3], NULL, 10);
        argc -= 3;
        argv += 3;
    }
    if ((argc != 3 && argc != 5) || (strcmp(argv[2], "heap") != 0 && strcmp(argv[2], "mixed") != 0) ||
        churn_percent > 100 || churn_run == 0) {
        fprintf(stderr, "usage: memload [--ticks PATH] [--churn PERCENT RUN_PAGES] MIB heap|mixed"
                        " [FILE FILE_MIB]\n");
        return 2;
    }
    size_t len = (size_t)strtoull(argv[1], NULL, 10) << 20;
    int mixed = strcmp(argv[2], "mixed") == 0;
    if (argc == 5 && write_file(argv[3], (size_t)strtoull(argv[4], NULL, 10), mixed) != 0)
        return 1;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (len == 0 || mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    uint64_t rng = 0x9e3779b97f4a7c15ULL, id = 1;
    for (size_t off = 0; off < len; off += STRIPE) {
        size_t n = len - off < STRIPE ? len - off : STRIPE;
        fill_stripe(mem + off, n, off / STRIPE, mixed, (uintptr_t)mem, &id, &rng);
    }
    uint64_t expected = checksum(mem, len);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready mib=%s kind=%s sum=%016llx\n", argv[1], argv[2], (unsigned long long)expected);

    const struct timespec nap = {0, (ticks < 0 ? 100 : 10) * 1000 * 1000};
    for (uint64_t tick = 1;; tick++) {
        nanosleep(&nap, NULL);
        if (ticks >= 0) {
            char line[22];
            snprintf(line, sizeof(line), "%020llu\n", (unsigned long long)tick);
            if (pwrite(ticks, line, 21, 0) != 21) {
                perror("ticks");
                return 1;
            }
        }
        if (churn_requested && churn_percent > 0) {
            churn_requested = 0;
            size_t pages = churn(mem, len, churn_percent, churn_run, mixed, &id, &rng);
            expected = checksum(mem, len);
            printf("churned pages=%zu sum=%016llx\n", pages, (unsigned long long)expected);
        }
        if (verify_requested) {
            verify_requested = 0;
            uint64_t sum = checksum(mem, len);
            if (sum == expected)
                printf("verify OK sum=%016llx\n", (unsigned long long)sum);
            else
                printf("verify BAD sum=%016llx expected=%016llx\n", (unsigned long long)sum,
                       (unsigned long long)expected);
        }
    }
}
