//! Arbitrary text as a stagerd configuration file: `config::parse` (YAML shape, then every
//! validation, including the checks that look at this machine's CPUs and at backing files'
//! metadata; nothing is created) must never panic, and every error it returns must start with
//! the file name, as the module promises ("every message starts with the file it came from").
//! Bytes that are not UTF-8 are replaced (U+FFFD), so every input is tried as some text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_target::config;

const ORIGIN: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match config::parse(&text, ORIGIN) {
        Ok(c) => {
            // What the daemon derives from a valid configuration must not panic either.
            for s in &c.subsystems {
                for ns in &s.namespaces {
                    let _ = (ns.effective_uuid(&s.nqn), ns.backend.block_size(), ns.backend.kind());
                }
            }
            let _ = format!("{c:?}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with(ORIGIN), "error does not name the file: {msg}");
            let _ = e.key();
        }
    }
});
