//! Scopes ClawOS gives a meaning to, written by whoever asks identity-manager for an
//! agent's token (the launcher) and read by the services that verify it.
//!
//! `clawos.budget.total:<N>` — the agent may spend at most `N` LLM tokens in total
//! (`1 ≤ N ≤` [`MAX_BUDGET_TOTAL`], decimal, no sign or leading zero). The launcher puts
//! it in the token of a VM started with a token budget; inference-proxy enforces it on
//! top of its own budgets. Every scope under [`BUDGET_NAMESPACE`] is ClawOS's: one that
//! is not exactly that form is an error for the verifier, never ignored (a budget a
//! service silently skipped would be no budget).

/// Prefix of every budget scope.
pub const BUDGET_NAMESPACE: &str = "clawos.budget.";
/// The name of the total budget scope, before `:<N>`.
pub const BUDGET_TOTAL: &str = "clawos.budget.total";
/// Largest total budget a token may carry: 10^12 tokens.
pub const MAX_BUDGET_TOTAL: u64 = 1_000_000_000_000;

/// The scope carrying a total budget of `tokens`.
pub fn budget_total(tokens: u64) -> String {
    format!("{BUDGET_TOTAL}:{tokens}")
}

/// A budget scope that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "agent token carries a malformed budget scope {0:?}: expected {BUDGET_TOTAL}:<N> with N from 1 to {MAX_BUDGET_TOTAL}; refused rather than served without its budget"
    )]
    Malformed(String),
    #[error(
        "agent token carries more than one budget scope ({0:?} and {1:?}); refused rather than guessing which applies"
    )]
    Duplicate(String, String),
}

/// The total budget `scopes` carry: none, one well-formed `clawos.budget.total:<N>`, or
/// an error for anything else under [`BUDGET_NAMESPACE`].
pub fn parse_budget_total(scopes: &[String]) -> Result<Option<u64>, ScopeError> {
    let mut found: Option<(&str, u64)> = None;
    for s in scopes.iter().filter(|s| s.starts_with(BUDGET_NAMESPACE)) {
        let n = s
            .strip_prefix(BUDGET_TOTAL)
            .and_then(|r| r.strip_prefix(':'))
            .and_then(parse_count)
            .ok_or_else(|| ScopeError::Malformed(s.clone()))?;
        if let Some((first, _)) = found {
            return Err(ScopeError::Duplicate(first.to_owned(), s.clone()));
        }
        found = Some((s, n));
    }
    Ok(found.map(|(_, n)| n))
}

/// `1..=MAX_BUDGET_TOTAL` written canonically: digits only, no leading zero.
fn parse_count(v: &str) -> Option<u64> {
    let canonical = !v.is_empty()
        && v.len() <= 13
        && v.bytes().all(|b| b.is_ascii_digit())
        && !v.starts_with('0');
    let n: u64 = v.parse().ok().filter(|_| canonical)?;
    (1..=MAX_BUDGET_TOTAL).contains(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_budget_round_trips_and_other_scopes_are_left_alone() {
        assert_eq!(budget_total(300), "clawos.budget.total:300");
        assert_eq!(parse_budget_total(&v(&[])), Ok(None));
        assert_eq!(
            parse_budget_total(&v(&["llm:invoke", "clawos.other:1"])),
            Ok(None)
        );
        for n in [1, 300, MAX_BUDGET_TOTAL] {
            assert_eq!(
                parse_budget_total(&v(&["llm:invoke", &budget_total(n)])),
                Ok(Some(n))
            );
        }
        // The largest scope fits identity-manager's 64-character limit.
        assert!(budget_total(MAX_BUDGET_TOTAL).len() <= 64);
    }

    #[test]
    fn malformed_or_unknown_budget_scopes_are_errors() {
        for bad in [
            "clawos.budget.total",
            "clawos.budget.total:",
            "clawos.budget.total:0",
            "clawos.budget.total:-5",
            "clawos.budget.total:+5",
            "clawos.budget.total:007",
            "clawos.budget.total:1e3",
            "clawos.budget.total:abc",
            "clawos.budget.total:1000000000001",
            "clawos.budget.total:99999999999999999999999",
            "clawos.budget.total:5:6",
            "clawos.budget.totalx:5",
            "clawos.budget.daily:5",
        ] {
            let e = parse_budget_total(&v(&[bad])).expect_err(bad);
            assert_eq!(e, ScopeError::Malformed(bad.to_owned()));
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = parse_budget_total(&v(&["clawos.budget.total:5", "clawos.budget.total:9"]))
            .expect_err("two budgets");
        assert!(matches!(e, ScopeError::Duplicate(..)), "{e}");
    }
}
