//! STUB: replaced by the real normalizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    pub path: String,
    pub match_path: String,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    EncodedSlash,
    EncodedBackslash,
    Nul,
    Backslash,
    Fragment,
    AboveRoot,
    NotAbsolute,
    InvalidEncoding,
}
impl PathError {
    pub fn message(self) -> &'static str {
        "bad path"
    }
}
pub fn normalize(raw: &str) -> Result<NormalizedPath, PathError> {
    Ok(NormalizedPath {
        path: raw.into(),
        match_path: raw.into(),
    })
}
