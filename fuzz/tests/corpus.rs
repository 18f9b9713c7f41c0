//! Replays every committed fuzzing input (`fuzz/corpus/<target>/*`) through its harness: the
//! regression suite of the fuzzers, run by `cargo test`. A crash the fuzzers find is saved as a
//! named file here (`corpus/<target>/crash-<what>`) once fixed, so it can never come back.

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut replayed = 0;
    for (name, harness) in ferry_fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!("corpus for target {name} missing at {}: {e}", dir.display())
        });
        let mut files: Vec<_> = entries.map(|e| e.expect("corpus entry").path()).collect();
        files.sort();
        assert!(!files.is_empty(), "target {name} has an empty corpus");
        for f in files {
            let data = std::fs::read(&f).expect("corpus file");
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{name}: input {} fails its harness", f.display());
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} corpus inputs");
}
