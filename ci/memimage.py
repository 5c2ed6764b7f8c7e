#!/usr/bin/env python3
"""Guest memory images for benchmarks (never committed): built from this host's files.

    ci/memimage.py DIR MIB [KIND...]     KIND: mix, random, zero (default: all three)

writes DIR/KIND.img of MIB MiB each:
  mix     a realistic mix: ELF binaries and libraries from /usr (45 %), text
          (20 %), zero pages (30 %), random pages (5 %), in runs of
          log-uniform length;
  random  all random (incompressible);
  zero    95 % zero pages, the rest text pages in runs of 1-8.
The layout is seeded (the same host and arguments give the same runs and
file contents); the random pages come from os.urandom.
Used by ci/bench-compression.sh and ci/bench-relay.sh.
"""
import os, random, sys
work, mib = sys.argv[1], int(sys.argv[2])
kinds = sys.argv[3:] or ["mix", "random", "zero"]
for k in kinds:
    if k not in ("mix", "random", "zero"):
        sys.exit(f"memimage.py: unknown image kind {k!r} (mix, random, zero)")
PAGE = 4096
pages = mib * 256
rng = random.Random(6)

def stream(paths, want):
    """Yields file contents from paths, round robin, forever."""
    while True:
        for p in paths:
            try:
                with open(p, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if want(data):
                yield data

def files(roots, pred):
    out = []
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                if pred(p):
                    out.append(p)
    rng.shuffle(out)
    return out

elf = files(["/usr/lib", "/usr/bin", "/usr/sbin"], lambda p: os.path.getsize(p) > 16384)
text = files(["/usr/include", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl5"],
             lambda p: not p.endswith((".gz", ".xz", ".bz2", ".png", ".pyc", ".zip")))

class Source:
    def __init__(self, gen):
        self.gen, self.buf = gen, b""
    def take(self, n):
        while len(self.buf) < n:
            self.buf += next(self.gen)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

bins = Source(stream(elf, lambda d: d[:4] == b"\x7fELF"))
txts = Source(stream(text, lambda d: b"\0" not in d[:4096]))

def extent(kind):
    # Run lengths: log-uniform, so there are many short runs and some long ones.
    hi = {"bin": 256, "text": 64, "zero": 512, "rand": 32}[kind]
    return max(1, int(2 ** rng.uniform(0, hi.bit_length() - 1)))

def mix(f):
    weights = [("bin", 0.45), ("text", 0.20), ("zero", 0.30), ("rand", 0.05)]
    done = {k: 0 for k, _ in weights}
    left = pages
    while left > 0:
        # Pick the kind furthest below its share, with some randomness.
        kind = max(weights, key=lambda kw: kw[1] * (pages - left + 1) - done[kw[0]] + rng.random() * 64)[0]
        n = min(extent(kind), left)
        if kind == "zero":
            f.write(bytes(n * PAGE))
        elif kind == "rand":
            f.write(os.urandom(n * PAGE))
        else:
            src = bins if kind == "bin" else txts
            f.write(src.take(n * PAGE))
        done[kind] += n
        left -= n
    return done

if "mix" in kinds:
    with open(os.path.join(work, "mix.img"), "wb") as f:
        done = mix(f)
    print("mix.img: " + ", ".join(f"{k} {100 * v / pages:.1f}%" for k, v in done.items()))
if "random" in kinds:
    with open(os.path.join(work, "random.img"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    print("random.img: 100% random")
if "zero" not in kinds:
    sys.exit(0)
with open(os.path.join(work, "zero.img"), "wb") as f:
    # 95 % zero; the rest text pages scattered in runs of 1-8.
    left, done = pages, 0
    while left > 0:
        z = min(left, rng.randint(1, 300))
        f.write(bytes(z * PAGE))
        left -= z
        t = min(left, rng.randint(1, 8))
        f.write(txts.take(t * PAGE))
        left -= t
        done += t
print(f"zero.img: {100 - 100 * done / pages:.1f}% zero")
