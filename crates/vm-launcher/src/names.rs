//! Names parsed once at the edge: a [`VmName`] or a [`SnapshotTag`] is a valid DNS
//! label by construction, so it can name a directory and never be a path, and nothing
//! downstream checks the string again.

use std::fmt;

use crate::LauncherError;

/// A VM's name: `[a-z0-9-]`, 1–63 characters, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmName(String);

/// A snapshot's tag: the same rules as a VM name (it names a directory too).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotTag(String);

impl VmName {
    /// Parses a VM name; the error names the rule it breaks.
    pub fn parse(s: &str) -> Result<Self, LauncherError> {
        label("VM name", s).map(|()| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SnapshotTag {
    /// Parses a snapshot tag; the error names the rule it breaks.
    pub fn parse(s: &str) -> Result<Self, LauncherError> {
        label("snapshot tag", s).map(|()| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! str_like {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<std::path::Path> for $t {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}
str_like!(VmName);
str_like!(SnapshotTag);

fn label(what: &str, name: &str) -> Result<(), LauncherError> {
    match clawos_api::label_problem(name) {
        None => Ok(()),
        Some(why) => Err(LauncherError::Invalid(format!(
            "invalid {what} {:?}: {why}",
            name.chars().take(80).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labels_never_paths() {
        for good in ["a", "my-agent", "agent-007", &"a".repeat(63)] {
            assert_eq!(VmName::parse(good).expect(good).as_str(), good);
            assert!(SnapshotTag::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "x/y",
            "A",
            "é",
            "-a",
            "a-",
            ".",
            "..",
            "a b",
            "a\0b",
            &"a".repeat(64),
            &"a".repeat(200),
        ] {
            assert!(VmName::parse(bad).is_err(), "{bad:?}");
            assert!(SnapshotTag::parse(bad).is_err(), "{bad:?}");
        }
        let e = VmName::parse("x/y").expect_err("a path").to_string();
        assert!(e.contains("VM name") && e.contains("lowercase"), "{e}");
        let e = SnapshotTag::parse("").expect_err("empty").to_string();
        assert!(e.contains("snapshot tag") && e.contains("empty"), "{e}");
    }
}
