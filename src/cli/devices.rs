//! `ascend-quant devices`: what Ascend runtime and NPUs this machine has.

use super::Failure;
use crate::acl::{Acl, AclFailure};
use anyhow::Context;
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// The AscendCL library (libascendcl.so) or its folder; default: ASCEND_QUANT_ACL_LIB, then the CANN install paths.
    #[arg(long)]
    pub acl_lib: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `devices`; a machine without a runtime is a normal answer (exit 0).
pub fn execute(args: &DevicesArgs) -> Result<(), Failure> {
    let acl = match Acl::load(args.acl_lib.as_deref()) {
        Ok(acl) => acl,
        Err(AclFailure::Load(e)) => {
            if args.json {
                println!(
                    "{}",
                    json!({"runtime": null, "devices": [], "reason": e.to_string()})
                );
            } else {
                println!("{e}");
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let (major, minor, patch) = acl.version().context("reading the runtime version")?;
    let soc = acl.soc_name();
    let count = acl.device_count().context("counting devices")?;
    let mut devices = Vec::new();
    for id in 0..count as i32 {
        let device = acl
            .device(id)
            .with_context(|| format!("opening device {id}"))?;
        let (free, total) = device
            .memory()
            .with_context(|| format!("reading the memory of device {id}"))?;
        devices.push(json!({"id": id, "memory_free": free, "memory_total": total}));
    }
    let libraries: Vec<String> = acl
        .libraries()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if args.json {
        let report = json!({"runtime": format!("{major}.{minor}.{patch}"), "soc": soc, "libraries": libraries, "devices": devices});
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serializing")?
        );
    } else {
        println!(
            "AscendCL {major}.{minor}.{patch} from {}",
            libraries.join(", ")
        );
        println!("SoC: {}", soc.as_deref().unwrap_or("unknown"));
        println!("{count} device(s)");
        for d in &devices {
            let gib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
            println!(
                "  device {}: {:.1} GiB free of {:.1} GiB",
                d["id"],
                gib(&d["memory_free"]),
                gib(&d["memory_total"])
            );
        }
    }
    Ok(())
}
