//! A bounded, stable-toolchain fuzz run of the config parser: the seed corpus of
//! `fuzz/corpus/config` and a few thousand deterministic mutations of it go through
//! `Config::parse`. No input may panic; every error is a message naming the file.
//! The coverage-guided run is `cargo +nightly fuzz run config` (see fuzz/README.md).

use std::path::{Path, PathBuf};

use portwake::config::Config;

/// Mutations per seed; `PORTWAKE_FUZZ_ITERATIONS` raises it for a longer run.
const DEFAULT_ITERATIONS: usize = 3000;

const TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    "0",
    "65535",
    "65536",
    "-1",
    "0o777",
    "Stream(address: \"1\")",
    "Datagram",
    "SequentialPacket",
    "name",
    "listen",
    "units",
    "\"@\"",
    "\"/\"",
    "\"[::]:1\"",
    "\"[fe80::1%lo]:1\"",
    "\"1s\"",
    "\"0s\"",
    "\"999999999999h\"",
    "true",
    "none",
    "Some(",
    "r#\"",
    "\\u{0}",
    "é",
    "//",
    "/*",
    "\n",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }
}

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(5) {
            0 => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = u8::try_from(rng.below(128)).unwrap();
            }
            3 => {
                let end = (at + rng.below(64)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(128)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
        }
    }
    out
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn parse(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let outcome = std::panic::catch_unwind(|| Config::parse(Path::new("/fuzz/host.ron"), text));
    match outcome {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let message = e.to_string();
            assert!(
                message.starts_with("/fuzz/host.ron"),
                "{message:?} for {text:?}"
            );
        }
        Err(_) => panic!("Config::parse panicked on {text:?}"),
    }
}

#[test]
fn config_parse_survives_mutations_of_the_seed_corpus() {
    let corpus = corpus();
    assert!(
        corpus.len() >= 3,
        "the seed corpus is in fuzz/corpus/config"
    );
    let iterations = std::env::var("PORTWAKE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for seed in &corpus {
        parse(seed);
        let mut current = seed.clone();
        for _ in 0..iterations {
            let next = mutate(&mut rng, &current, &corpus);
            parse(&next);
            // Wander away from the seed, but come back now and then.
            current = if rng.below(8) == 0 {
                seed.clone()
            } else {
                next
            };
        }
    }
}
