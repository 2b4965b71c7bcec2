//! Flag value parsers matching Go's `flag` package, so manifests written for
//! the upstream binaries parse here unchanged.

/// A boolean as Go's `strconv.ParseBool` reads it.
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "TRUE" | "1" | "t" | "T" => Ok(true),
        "false" | "False" | "FALSE" | "0" | "f" | "F" => Ok(false),
        _ => Err(format!("invalid boolean {s:?}")),
    }
}
