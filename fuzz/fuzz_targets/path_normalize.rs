//! Feeds arbitrary UTF-8 to `portcullis::path::normalize` and checks that it
//! never panics and that whatever it accepts is canonical: absolute, ASCII,
//! no empty or dot-segments (none hiding behind `;parameters` either), no
//! parameters in the matching form, and unchanged by a second pass.
//!
//! Run with `cargo +nightly fuzz run path_normalize` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::path::normalize;

fuzz_target!(|raw_path: &str| {
    let Ok(normalized) = normalize(raw_path) else {
        return;
    };
    for path in [normalized.path.as_str(), normalized.match_path()] {
        assert!(path.starts_with('/'), "{raw_path:?} -> {normalized:?}");
        assert!(path.is_ascii(), "{raw_path:?} -> {normalized:?}");
        assert!(!path.contains("//"), "{raw_path:?} -> {normalized:?}");
        for segment in path.split('/') {
            let name = segment.split(';').next().unwrap_or_default();
            assert!(
                name != "." && name != "..",
                "{raw_path:?} -> {normalized:?}"
            );
        }
    }
    assert!(
        !normalized.match_path().contains(';'),
        "{raw_path:?} -> {normalized:?}"
    );
    assert_eq!(
        normalize(&normalized.path),
        Ok(normalized.clone()),
        "{raw_path:?} is not normalized idempotently"
    );
});
