//! codec-speed IMAGE [REPS]: per-core encode speed and ratio of each
//! candidate encoder on IMAGE, cut as Ferry's page path cuts it (4 MiB
//! chunks, each maximal run of non-zero pages compressed on its own in
//! segments of at most 256 KiB, zero pages left out: they travel as flags;
//! `ferry relay` compresses stream chunks of at most 256 KiB too). Encoders run one after the other
//! on one thread, REPS rounds, interleaved within each round so that the
//! machine's load falls on all of them; each lz4 output is decoded with
//! lz4_flex's safe decoder (Ferry's) and compared with its input, each
//! zstd output with zstd's.
use std::time::Instant;

const PAGE: usize = 4096;
const CHUNK: usize = 4 << 20;
/// `wire::MAX_SEGMENT` (and the relay's `MAX_STREAM_CHUNK`).
const SEGMENT: usize = 256 << 10;

fn runs(img: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for chunk in img.chunks(CHUNK) {
        let mut start = None;
        for (i, p) in chunk.chunks(PAGE).enumerate() {
            match (p.iter().all(|&b| b == 0), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push(&chunk[s * PAGE..i * PAGE]);
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push(&chunk[s * PAGE..]);
        }
    }
    out.into_iter().flat_map(|r| r.chunks(SEGMENT)).collect()
}

/// liblz4's version as "1.10.0" (`lz4::version()` is 11000 for it).
fn liblz4_version() -> String {
    let v = lz4::version();
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

type Enc = Box<dyn FnMut(&[u8], &mut [u8]) -> usize>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let img = std::fs::read(&args[1]).expect("reading the image");
    let reps: usize = args.get(2).map_or(5, |s| s.parse().expect("REPS"));
    let rs = runs(&img);
    let total: usize = rs.iter().map(|r| r.len()).sum();
    // lz4_flex asks for 110% of the input (the largest bound of the three).
    let mut dst = vec![0u8; lz4_flex::block::get_maximum_output_size(SEGMENT)];
    let mut back = vec![0u8; SEGMENT];
    let mut encs: Vec<(String, bool, Enc)> = vec![(
        "lz4_flex 0.11 (Ferry's today)".into(),
        false,
        Box::new(|s: &[u8], d: &mut [u8]| lz4_flex::block::compress_into(s, d).unwrap()),
    )];
    encs.push((
        "lz4_flex 0.14".into(),
        false,
        Box::new(|s: &[u8], d: &mut [u8]| lz4_flex_014::block::compress_into(s, d).unwrap()),
    ));
    for a in [1, 2, 4, 8] {
        encs.push((
            format!("liblz4 {} acceleration {a}", liblz4_version()),
            false,
            Box::new(move |s: &[u8], d: &mut [u8]| {
                let mode = Some(lz4::block::CompressionMode::FAST(a));
                lz4::block::compress_to_buffer(s, mode, false, d).unwrap()
            }),
        ));
    }
    for l in [1, -1, -3, -5] {
        let mut z = zstd::bulk::Compressor::new(l).unwrap();
        encs.push((
            format!("zstd level {l}"),
            true,
            Box::new(move |s: &[u8], d: &mut [u8]| z.compress_to_buffer(s, d).unwrap()),
        ));
    }
    let mut zd = zstd::bulk::Decompressor::new().unwrap();
    // Round trip first (and warm-up).
    let mut wire = vec![0usize; encs.len()];
    for (k, (name, is_zstd, f)) in encs.iter_mut().enumerate() {
        for r in &rs {
            let n = f(r, &mut dst);
            let d = &mut back[..r.len()];
            let got = if *is_zstd {
                zd.decompress_to_buffer(&dst[..n], d).unwrap()
            } else {
                lz4_flex::block::decompress_into(&dst[..n], d).unwrap()
            };
            assert!(got == r.len() && d == *r, "{name}: round trip");
            wire[k] += n.min(r.len());
        }
    }
    let mut secs = vec![Vec::new(); encs.len()];
    for _ in 0..reps {
        for (k, (_, _, f)) in encs.iter_mut().enumerate() {
            let t = Instant::now();
            for r in &rs {
                std::hint::black_box(f(r, &mut dst));
            }
            secs[k].push(t.elapsed().as_secs_f64());
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{} MiB of non-zero pages in {} runs; {reps} interleaved rounds",
        total >> 20,
        rs.len()
    );
    println!(
        "{:34} {:>10} {:>7} {:>14}",
        "encoder", "MB/s/core", "ratio", "speed/lz4_flex"
    );
    for (k, (name, _, _)) in encs.iter().enumerate() {
        // Per round, this encoder's speed over lz4_flex 0.11's (same round).
        let per: Vec<f64> = secs[0].iter().zip(&secs[k]).map(|(a, b)| a / b).collect();
        println!(
            "{:34} {:>10.0} {:>7.3} {:>14.2}",
            name,
            total as f64 / median(&secs[k]) / 1e6,
            total as f64 / wire[k] as f64,
            median(&per)
        );
    }
}
