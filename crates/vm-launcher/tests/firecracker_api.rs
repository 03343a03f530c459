//! Every request body the Firecracker backend sends validates against the schemas of
//! Firecracker's official API spec (`shared/reference/firecracker-api.yaml`, beside the
//! checkout; `CLAWOS_FIRECRACKER_SPEC` points elsewhere). Without the spec the test
//! records a skip, which `scripts/test.sh` does not allow.

use std::path::PathBuf;

use clawos_vm_launcher::backend::LaunchSpec;
use clawos_vm_launcher::backend::firecracker::{BootFiles, all_calls};
use clawos_vm_launcher::store::VmDir;
use serde_json::Value;

fn spec_path() -> PathBuf {
    std::env::var_os("CLAWOS_FIRECRACKER_SPEC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/reference/firecracker-api.yaml")
        })
}

/// Checks `v` against a Swagger 2.0 schema: types, required fields, no unknown
/// fields, enums, minimums, `$ref`s. Returns the problems found.
fn check(v: &Value, schema: &Value, defs: &Value, at: &str, problems: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/definitions/");
        return check(v, &defs[name], defs, &format!("{at}<{name}>"), problems);
    }
    let ty = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let ok = match ty {
        "object" => v.is_object(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        _ => true,
    };
    if !ok {
        problems.push(format!("{at}: expected {ty}, got {v}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        problems.push(format!("{at}: {v} not in {allowed:?}"));
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        problems.push(format!("{at}: {n} below minimum {min}"));
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                problems.push(format!("{at}: missing required field {r}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(val, s, defs, &format!("{at}.{k}"), problems),
                None => problems.push(format!("{at}: field {k} is not in the schema")),
            }
        }
    }
}

/// The body schema of `method path` (path templates like `/drives/{drive_id}` match).
fn body_schema<'a>(spec: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    let paths = spec["paths"].as_object()?;
    let (_, item) = paths.iter().find(|(template, _)| {
        let t: Vec<&str> = template.split('/').collect();
        let p: Vec<&str> = path.split('/').collect();
        t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a.starts_with('{') || a == b)
    })?;
    item[method]["parameters"]
        .as_array()?
        .iter()
        .find(|p| p["in"] == "body")
        .map(|p| &p["schema"])
}

#[test]
fn every_firecracker_call_matches_the_official_schema() {
    let path = spec_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            clawos_test_skip::record(
                "every_firecracker_call_matches_the_official_schema",
                &format!(
                    "Firecracker API spec not readable at {}: {e} (set CLAWOS_FIRECRACKER_SPEC)",
                    path.display()
                ),
            );
            return;
        }
    };
    let spec: Value = serde_yaml::from_str(&text).expect("the spec is YAML");
    let launch = LaunchSpec {
        name: "a".into(),
        dir: VmDir {
            root: "/s/vms/a".into(),
        },
        mem_mib: 256,
        vcpus: 2,
        kernel: "/img/vmlinuz".into(),
        vmlinux: Some("/img/vmlinux".into()),
        initramfs: "/img/initramfs.cpio.gz".into(),
        rootfs: "/img/rootfs.img".into(),
        rootfs_fd: None,
        image_cmdline: "panic=-1".into(),
        snapshots: false,
    };
    let files = BootFiles {
        vmlinux: "/vmlinux".into(),
        initramfs: "/initramfs.cpio.gz".into(),
        rootfs: "/rootfs.img".into(),
        runtime: "/runtime.img".into(),
        workspace: "/workspace.img".into(),
        config: "/config.img".into(),
    };
    let calls = all_calls(&launch, &files);
    assert!(calls.len() >= 10, "every call is covered");
    let mut problems = Vec::new();
    for (method, p, body) in &calls {
        match body_schema(&spec, method, p) {
            Some(schema) => check(
                body,
                schema,
                &spec["definitions"],
                &format!("{method} {p}"),
                &mut problems,
            ),
            None => problems.push(format!("{method} {p}: no such operation in the spec")),
        }
    }
    assert!(
        problems.is_empty(),
        "requests violate the Firecracker API spec:\n{}",
        problems.join("\n")
    );

    // The checker itself catches what it should.
    let mut p = Vec::new();
    let schema = body_schema(&spec, "put", "/vsock").expect("vsock schema");
    check(
        &serde_json::json!({"guest_cid": 2, "bogus": 1}),
        schema,
        &spec["definitions"],
        "t",
        &mut p,
    );
    assert!(
        p.iter().any(|m| m.contains("uds_path"))
            && p.iter().any(|m| m.contains("bogus"))
            && p.iter().any(|m| m.contains("minimum")),
        "{p:?}"
    );
}
