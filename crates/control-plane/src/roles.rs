//! Groups from an identity provider → a ClawOS role: the mapping the operator
//! configures (`group=role,…`) for OIDC and SAML alike.

use clawos_control_plane_api::Role;

/// Parses `group=role,group=role`.
pub fn parse_role_map(s: &str) -> Result<Vec<(String, Role)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (g, r) = pair
                .split_once('=')
                .ok_or_else(|| format!("role map entry {pair:?}: group=role"))?;
            let role = r.trim().parse::<Role>()?;
            Ok((g.trim().to_owned(), role))
        })
        .collect()
}

/// The highest role any of `groups` maps to; `None` when none is mapped (no role, not
/// the lowest one).
pub fn role_for(groups: &[String], map: &[(String, Role)]) -> Option<Role> {
    map.iter()
        .filter(|(g, _)| groups.iter().any(|x| x == g))
        .map(|(_, r)| *r)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_maps_parse_and_bad_entries_are_named() {
        let m = parse_role_map("ops=operator, admins=admin").expect("ok");
        assert_eq!(
            m,
            vec![
                ("ops".into(), Role::Operator),
                ("admins".into(), Role::Admin)
            ]
        );
        assert!(
            parse_role_map("ops")
                .expect_err("no =")
                .contains("group=role")
        );
        assert!(
            parse_role_map("ops=root")
                .expect_err("role")
                .contains("unknown role")
        );
    }

    #[test]
    fn the_highest_mapped_role_wins_and_unmapped_groups_give_none() {
        let m = parse_role_map("ops=operator,admins=admin,all=viewer").expect("ok");
        let g = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(role_for(&g(&["all", "admins"]), &m), Some(Role::Admin));
        assert_eq!(role_for(&g(&["ops"]), &m), Some(Role::Operator));
        assert_eq!(role_for(&g(&["marketing"]), &m), None);
        assert_eq!(role_for(&[], &m), None);
    }
}
