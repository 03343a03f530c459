//! The `clawos.*` parameters of the kernel command line.

use std::collections::BTreeMap;

/// Verity parameters of the rootfs, from the signed part of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
    pub hash_start: u64,
}

/// Parses `clawos.key=value` words. A key given twice is an error: a later copy must
/// never override what the image signed.
pub fn parse(cmdline: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for word in cmdline.split_ascii_whitespace() {
        let Some(rest) = word.strip_prefix("clawos.") else {
            continue;
        };
        let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!(
                "clawos.{k} is given twice on the kernel command line"
            ));
        }
    }
    Ok(out)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Extracts and checks the verity parameters.
pub fn verity(params: &BTreeMap<String, String>) -> Result<VerityParams, String> {
    let get = |k: &str| {
        params
            .get(k)
            .ok_or_else(|| format!("clawos.{k} missing from the kernel command line"))
    };
    let root_hash = get("root_hash")?.clone();
    let salt = get("salt")?.clone();
    if !is_hex(&root_hash, 64) {
        return Err(format!(
            "clawos.root_hash {root_hash:?} is not 64 hex digits"
        ));
    }
    if !salt.bytes().all(|b| b.is_ascii_hexdigit()) || salt.len() > 512 || salt.len() % 2 != 0 {
        return Err(format!("clawos.salt {salt:?} is not hex"));
    }
    let num = |k: &str| -> Result<u64, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("clawos.{k} is not a number"))
    };
    let data_blocks = num("data_blocks")?;
    let hash_start = num("hash_start")?;
    if data_blocks == 0 || hash_start <= data_blocks {
        return Err("clawos.data_blocks/hash_start are inconsistent".into());
    }
    Ok(VerityParams {
        root_hash,
        salt,
        data_blocks,
        hash_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused() {
        assert!(parse("quiet clawos.root_hash=aa clawos.root_hash=bb").is_err());
        let p = parse("console=ttyS0 clawos.vm=x clawos.flag").expect("parse");
        assert_eq!(p.get("vm").map(String::as_str), Some("x"));
        assert_eq!(p.get("flag").map(String::as_str), Some(""));
    }

    #[test]
    fn verity_params_are_validated() {
        let good = format!(
            "clawos.root_hash={} clawos.salt=ab clawos.data_blocks=10 clawos.hash_start=11",
            "a".repeat(64)
        );
        let v = verity(&parse(&good).expect("parse")).expect("verity");
        assert_eq!(v.data_blocks, 10);
        let bad = good.replace("hash_start=11", "hash_start=5");
        assert!(verity(&parse(&bad).expect("parse")).is_err());
        assert!(verity(&parse("clawos.salt=ab").expect("parse")).is_err());
    }
}
