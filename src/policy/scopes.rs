//! STUB
#[derive(Debug)]
pub struct MissingScopes(pub String);
impl std::fmt::Display for MissingScopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
pub fn check(required: &[String], granted: &[&str]) -> Result<(), MissingScopes> {
    if required.iter().all(|r| granted.contains(&r.as_str())) {
        Ok(())
    } else {
        Err(MissingScopes(required.join(" ")))
    }
}
