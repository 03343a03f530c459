//! Validation at the edge of values that are not names (those are [`crate::names`]):
//! a model cannot inject lines, sizes are bounded by the host.

use crate::LauncherError;

/// Smallest guest memory that boots the agent image.
pub const MIN_MEM_MIB: u32 = 128;

/// A model name goes into the guest's environment file: no line breaks or shell
/// metacharacters.
pub fn model(model: &str) -> Result<(), LauncherError> {
    let ok = !model.is_empty()
        && model.len() <= 128
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LauncherError::Invalid(format!(
            "invalid model {:?}: 1-128 characters of A-Z a-z 0-9 . _ : / @ -",
            model.chars().take(80).collect::<String>()
        )))
    }
}

/// Memory and vCPUs within what this host has.
pub fn resources(
    mem_mib: u32,
    vcpus: u32,
    host_mem_mib: u64,
    host_cpus: u32,
) -> Result<(), LauncherError> {
    if u64::from(mem_mib) > host_mem_mib || mem_mib < MIN_MEM_MIB {
        return Err(LauncherError::Invalid(format!(
            "invalid memory {mem_mib} MiB: must be between {MIN_MEM_MIB} and the host's {host_mem_mib} MiB"
        )));
    }
    if vcpus == 0 || vcpus > host_cpus {
        return Err(LauncherError::Invalid(format!(
            "invalid vcpus {vcpus}: must be between 1 and the host's {host_cpus}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_cannot_inject_lines() {
        assert!(model("claude-sonnet-4.5").is_ok());
        assert!(model("org/model:tag").is_ok());
        assert!(model("x\nANTHROPIC_API_KEY=y").is_err());
        assert!(model("").is_err());
        assert!(model("a b").is_err());
    }

    #[test]
    fn resources_are_bounded_by_the_host() {
        assert!(resources(512, 1, 1024, 2).is_ok());
        assert!(resources(0, 1, 1024, 2).is_err());
        assert!(resources(2048, 1, 1024, 2).is_err());
        assert!(resources(512, 0, 1024, 2).is_err());
        assert!(resources(512, 3, 1024, 2).is_err());
    }
}
