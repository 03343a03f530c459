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

/// An idempotency key is recorded in the VM's record and compared byte for byte.
pub fn idempotency_key(key: &str) -> Result<(), LauncherError> {
    if clawos_vm_launcher_api::valid_idempotency_key(key) {
        Ok(())
    } else {
        Err(LauncherError::Invalid(format!(
            "invalid idempotency_key {:?}: 1-{} characters of A-Z a-z 0-9 . _ : / -",
            key.chars().take(80).collect::<String>(),
            clawos_vm_launcher_api::MAX_IDEMPOTENCY_KEY
        )))
    }
}

/// A token budget goes into the VM's agent token as `clawos.budget.total:<N>`.
pub fn token_budget(tokens: u64) -> Result<(), LauncherError> {
    use clawos_vm_launcher_api::MAX_TOKEN_BUDGET;
    if (1..=MAX_TOKEN_BUDGET).contains(&tokens) {
        Ok(())
    } else {
        Err(LauncherError::Invalid(format!(
            "invalid token_budget {tokens}: 1 to {MAX_TOKEN_BUDGET} tokens"
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

/// Guest memory enough for the agent runtime image `image` names in its manifest (none:
/// the built-in runtime, which needs no more than [`MIN_MEM_MIB`]).
pub fn runtime_memory(
    image: &str,
    runtime: Option<&clawos_image::manifest::AgentRuntime>,
    mem_mib: u32,
) -> Result<(), LauncherError> {
    match runtime {
        Some(rt) if rt.min_mem_mib > mem_mib => Err(LauncherError::Invalid(format!(
            "image {image} runs {} {}, which needs at least {} MiB of guest memory; \
             {mem_mib} MiB asked (start it with --mem {} or more)",
            rt.name, rt.version, rt.min_mem_mib, rt.min_mem_mib
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_gets_the_memory_its_image_asks_for() {
        let rt = clawos_image::manifest::AgentRuntime {
            name: "openclaw".into(),
            version: "2026.9.6".into(),
            min_mem_mib: 2048,
            ready_timeout_secs: 600,
        };
        assert!(runtime_memory("openclaw", None, 128).is_ok());
        assert!(runtime_memory("openclaw", Some(&rt), 2048).is_ok());
        assert!(runtime_memory("openclaw", Some(&rt), 4096).is_ok());
        let e = runtime_memory("openclaw", Some(&rt), 512).expect_err("too small");
        assert!(matches!(e, LauncherError::Invalid(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "image openclaw runs openclaw 2026.9.6, which needs at least 2048 MiB of guest \
             memory; 512 MiB asked (start it with --mem 2048 or more)"
        );
    }

    #[test]
    fn models_cannot_inject_lines() {
        assert!(model("claude-sonnet-4.5").is_ok());
        assert!(model("org/model:tag").is_ok());
        assert!(model("x\nANTHROPIC_API_KEY=y").is_err());
        assert!(model("").is_err());
        assert!(model("a b").is_err());
    }

    #[test]
    fn idempotency_keys_are_short_printable_labels() {
        for ok in ["a", "wf-1/step:2.attempt_3", &"k".repeat(128)] {
            assert!(idempotency_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", &"k".repeat(129), "a b", "a\nb", "é", "a;b", "a\"b"] {
            let e = idempotency_key(bad).expect_err(bad);
            assert!(matches!(e, LauncherError::Invalid(_)), "{e}");
            assert!(e.to_string().contains("idempotency_key"), "{e}");
        }
    }

    #[test]
    fn token_budgets_fit_the_scope_the_proxy_reads() {
        use clawos_agent_token::scopes;
        assert!(token_budget(0).is_err());
        assert!(token_budget(1).is_ok());
        assert!(token_budget(clawos_vm_launcher_api::MAX_TOKEN_BUDGET).is_ok());
        assert!(token_budget(clawos_vm_launcher_api::MAX_TOKEN_BUDGET + 1).is_err());
        assert!(token_budget(u64::MAX).is_err());
        // Every budget the launcher accepts is one the proxy accepts back.
        assert_eq!(
            clawos_vm_launcher_api::MAX_TOKEN_BUDGET,
            scopes::MAX_BUDGET_TOTAL
        );
        for n in [1, 300, scopes::MAX_BUDGET_TOTAL] {
            assert_eq!(
                scopes::parse_budget_total(&[scopes::budget_total(n)]),
                Ok(Some(n))
            );
        }
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
