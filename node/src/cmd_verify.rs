//! `sampo verify FILE`: check a saved evidence bundle offline, trusting no one.

use std::path::Path;

use anyhow::{Context, bail};
use sampo_consensus::{EvidenceBundle, Mark, Outcome, SignedEnvelope, verify};

/// Read a bundle (the JSON of `GET /v1/tasks/{id}/evidence`, or the raw envelope bytes),
/// verify it and print the outcome. Fails, naming what is wrong, if it does not verify.
pub(crate) fn run(file: &Path, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let envelope = match serde_json::from_slice::<EvidenceBundle>(&bytes) {
        Ok(bundle) => {
            if bundle.format != EvidenceBundle::FORMAT {
                bail!(
                    "{}: unknown bundle format {:?} (expected {:?})",
                    file.display(),
                    bundle.format,
                    EvidenceBundle::FORMAT
                );
            }
            bundle.verdict
        }
        Err(json_err) => match SignedEnvelope::from_bytes(&bytes) {
            Ok(env) => env,
            Err(_) => bail!("{}: not an evidence bundle: {json_err}", file.display()),
        },
    };
    let v = verify(&envelope).map_err(|e| anyhow::anyhow!("INVALID: {e}"))?;
    if json {
        let out = serde_json::json!({
            "valid": true,
            "task": v.task().to_string(),
            "attempt": v.verdict.attempt,
            "coordinator": v.coordinator.to_string(),
            "outcome": v.verdict.outcome.as_str(),
            "output": match &v.verdict.outcome { Outcome::Finalized { output } => Some(output.clone()), _ => None },
            "marks": v.verdict.marks.iter().map(|(p, m)| (p.to_string(), format!("{m:?}").to_lowercase())).collect::<std::collections::BTreeMap<_, _>>(),
            "payouts": v.verdict.payouts.iter().map(|(p, c)| (p.to_string(), *c)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!("VALID: every signature, hash, membership and the quorum arithmetic check out");
    println!("task:        {} (attempt {})", v.task(), v.verdict.attempt);
    println!("coordinator: {}", v.coordinator);
    match &v.verdict.outcome {
        Outcome::Finalized { output } => println!("outcome:     finalized, {} output tokens", output.len()),
        other => println!("outcome:     {}", other.as_str()),
    }
    for (peer, mark) in &v.verdict.marks {
        let paid = v.verdict.payouts.iter().find(|(p, _)| p == peer).map(|(_, c)| *c).unwrap_or(0);
        let mark = match mark {
            Mark::Agreed => "agreed",
            Mark::Wrong => "WRONG",
            Mark::Absent => "absent",
            Mark::Undecided => "undecided",
        };
        println!("  {peer}  {mark:<9} {paid} credits");
    }
    Ok(())
}
