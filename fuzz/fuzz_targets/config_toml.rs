//! Any bytes: `Config::from_toml_str` returns Ok or Err, never panics, and every error
//! carries a line and column inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = ballast::config::Config::from_toml_str(text, Path::new("fuzz.toml")) {
        let lines = text.lines().count().max(1);
        for p in &e.problems {
            assert!(p.line >= 1 && p.line <= lines + 1, "line {} of {lines}", p.line);
        }
    }
});
