/*
 * memcheck: the guest program of Ferry's real-guest tests (ci/qemu/).
 *
 * Runs as the only program of a small Linux guest under QEMU (started by the
 * initramfs's /init), or natively on the host for a self-test. It allocates
 * N MiB, fills every 4 KiB page with a pattern that depends on the page's
 * number and the page's own generation counter, and then, pass after pass:
 *
 *   1. rewrites a bounded slice of the pages with their next generation
 *      (round robin over the area: this is the guest dirtying its memory);
 *   2. checks every page against the pattern of the generation it should
 *      hold, and prints one line: "pass K OK ..." or "pass K BAD ...";
 *   3. waits for the rest of the pass period by SPINNING on the monotonic
 *      clock. Never by sleeping: a guest that halts while QEMU 7.2 TCG
 *      migrates it for seconds came up hung or crashed on the destination
 *      (see shared/qemu-guest.md); a busy vCPU survives.
 *
 * A page that holds another page's content, an older or newer generation,
 * a flipped bit, or zeros fails the check: each page's 512 words are an
 * arithmetic sequence started from a 64-bit hash of (page, generation).
 * The generation table itself lives in guest memory too, so it migrates
 * with the pages it describes.
 *
 * Options (command line, or memcheck.NAME=VALUE on the kernel command line
 * with --cmdline, which reads /proc/cmdline):
 *   --mib N          area size in MiB (default 64)
 *   --slice-mib N    MiB rewritten per pass (default 4)
 *   --period-ms N    pass period in ms (default 500); a pass that takes
 *                    longer is followed at once by the next
 *   --passes N       stop after N passes, exit 0 if all were OK, else 1
 *                    (default 0: run forever, as in the guest)
 *   --corrupt-at K   self-test: flip one bit of one page after pass K's
 *                    rewrite, so pass K must report BAD
 *
 * Output (stdout, one write per line):
 *   memcheck: start mib=N pages=P slice_pages=S period_ms=T
 *   pass K OK pages=P gen=G ms=M          (M: the pass's duration, guest clock)
 *   pass K BAD bad_pages=B first_page=F word=W want=0x.. got=0x.. gen=G
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define STEP 0x9E3779B97F4A7C15ull

struct opts {
    uint64_t mib, slice_mib, period_ms, passes, corrupt_at;
};

static void out(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    const char *p = line;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (int)w;
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64's finaliser: a bijection, so distinct (page, gen) give
 * distinct first words. */
static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t page_seed(uint64_t page, uint32_t gen)
{
    return mix((page << 32) ^ gen ^ 0x6665727279ull /* "ferry" */);
}

static void fill(uint64_t *w, uint64_t page, uint32_t gen)
{
    uint64_t v = page_seed(page, gen);
    for (unsigned i = 0; i < PAGE_WORDS; i++, v += STEP)
        w[i] = v;
}

/* Index of the first word that differs from the pattern, or -1. */
static int check(const uint64_t *w, uint64_t page, uint32_t gen)
{
    uint64_t v = page_seed(page, gen);
    uint64_t diff = 0;
    for (unsigned i = 0; i < PAGE_WORDS; i++, v += STEP)
        diff |= w[i] ^ v;
    if (!diff)
        return -1;
    v = page_seed(page, gen);
    for (unsigned i = 0; i < PAGE_WORDS; i++, v += STEP)
        if (w[i] != v)
            return (int)i;
    return -1;
}

static int parse_u64(const char *name, const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        out("memcheck: bad value for %s: '%s'\n", name, s);
        return -1;
    }
    *v = x;
    return 0;
}

static int set_opt(struct opts *o, const char *name, const char *val)
{
    static const struct { const char *name; size_t off; } tab[] = {
        { "mib", offsetof(struct opts, mib) },
        { "slice-mib", offsetof(struct opts, slice_mib) },
        { "period-ms", offsetof(struct opts, period_ms) },
        { "passes", offsetof(struct opts, passes) },
        { "corrupt-at", offsetof(struct opts, corrupt_at) },
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (!strcmp(name, tab[i].name))
            return parse_u64(name, val, (uint64_t *)((char *)o + tab[i].off));
    out("memcheck: unknown option '%s'\n", name);
    return -1;
}

/* memcheck.NAME=VALUE words of /proc/cmdline. */
static int read_cmdline(struct opts *o)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) {
        out("memcheck: cannot open /proc/cmdline: %s\n", strerror(errno));
        return -1;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    for (char *save = NULL, *tok = strtok_r(buf, " \n", &save); tok;
         tok = strtok_r(NULL, " \n", &save)) {
        if (strncmp(tok, "memcheck.", 9))
            continue;
        char *eq = strchr(tok + 9, '=');
        if (!eq) {
            out("memcheck: '%s' has no value\n", tok);
            return -1;
        }
        *eq = 0;
        /* Kernel parameters use '_' or '-' interchangeably. */
        for (char *c = tok + 9; *c; c++)
            if (*c == '_')
                *c = '-';
        if (set_opt(o, tok + 9, eq + 1))
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o = { .mib = 64, .slice_mib = 4, .period_ms = 500 };
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cmdline")) {
            if (read_cmdline(&o))
                return 2;
        } else if (!strncmp(argv[i], "--", 2) && i + 1 < argc) {
            if (set_opt(&o, argv[i] + 2, argv[i + 1]))
                return 2;
            i++;
        } else {
            out("usage: memcheck [--cmdline] [--mib N] [--slice-mib N] [--period-ms N] "
                "[--passes N] [--corrupt-at K]\n");
            return 2;
        }
    }
    if (!o.mib || o.mib > (1u << 20) || o.slice_mib > o.mib) {
        out("memcheck: need 0 < mib <= 1048576 and slice-mib <= mib (mib=%" PRIu64
            " slice-mib=%" PRIu64 ")\n", o.mib, o.slice_mib);
        return 2;
    }
    const uint64_t pages = o.mib * (1u << 20) / PAGE_BYTES;
    const uint64_t slice = o.slice_mib * (1u << 20) / PAGE_BYTES;
    uint64_t *mem = mmap(NULL, pages * PAGE_BYTES, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    uint32_t *gen = calloc(pages, sizeof *gen);
    if (mem == MAP_FAILED || !gen) {
        out("memcheck: cannot allocate %" PRIu64 " MiB: %s\n", o.mib, strerror(errno));
        return 2;
    }
    for (uint64_t p = 0; p < pages; p++)
        fill(mem + p * PAGE_WORDS, p, 0);
    out("memcheck: start mib=%" PRIu64 " pages=%" PRIu64 " slice_pages=%" PRIu64
        " period_ms=%" PRIu64 "\n", o.mib, pages, slice, o.period_ms);

    uint64_t cursor = 0, any_bad = 0, max_gen = 0;
    for (uint64_t pass = 1; !o.passes || pass <= o.passes; pass++) {
        const uint64_t start = now_ns();
        for (uint64_t n = 0; n < slice; n++) {
            uint64_t p = cursor;
            cursor = (cursor + 1) % pages;
            gen[p]++;
            if (gen[p] > max_gen)
                max_gen = gen[p];
            fill(mem + p * PAGE_WORDS, p, gen[p]);
        }
        if (o.corrupt_at == pass)
            mem[(pages / 2) * PAGE_WORDS + 7] ^= 1ull << 13;

        uint64_t bad = 0, first = 0, want = 0, got = 0;
        int word = -1;
        for (uint64_t p = 0; p < pages; p++) {
            const uint64_t *w = mem + p * PAGE_WORDS;
            int i = check(w, p, gen[p]);
            if (i < 0)
                continue;
            if (!bad++) {
                first = p;
                word = i;
                got = w[i];
                want = page_seed(p, gen[p]) + (uint64_t)i * STEP;
            }
        }
        const uint64_t ms = (now_ns() - start) / 1000000u;
        if (bad) {
            any_bad = 1;
            out("pass %" PRIu64 " BAD bad_pages=%" PRIu64 " first_page=%" PRIu64
                " word=%d want=0x%016" PRIx64 " got=0x%016" PRIx64 " gen=%" PRIu32 "\n",
                pass, bad, first, word, want, got, gen[first]);
            /* Re-baseline the bad pages so a later pass reports only new damage. */
            for (uint64_t p = 0; p < pages; p++)
                if (check(mem + p * PAGE_WORDS, p, gen[p]) >= 0)
                    fill(mem + p * PAGE_WORDS, p, gen[p]);
        } else {
            out("pass %" PRIu64 " OK pages=%" PRIu64 " gen=%" PRIu64 " ms=%" PRIu64 "\n",
                pass, pages, max_gen, ms);
        }
        /* Spin, never sleep (see the header). */
        const uint64_t until = start + o.period_ms * 1000000u;
        while (now_ns() < until)
            ;
    }
    return any_bad ? 1 : 0;
}
