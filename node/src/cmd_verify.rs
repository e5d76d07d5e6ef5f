//! `sampo verify FILE`: check a saved evidence bundle offline, trusting no one; with
//! `--replay --model FILE`, also re-execute it: does the model produce each member's
//! revealed output?

use std::path::Path;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use sampo_consensus::{EvidenceBundle, Mark, Outcome, PeerId, SignedEnvelope, VerifiedVerdict, verify};
use sampo_kernels::Replay;
use sampo_node::models::LoadedModel;

/// Read a bundle (the JSON of `GET /v1/tasks/{id}/evidence`, or the raw envelope bytes),
/// verify it and print the outcome. Fails, naming what is wrong, if it does not verify.
pub(crate) fn run(file: &Path, json: bool, replay_model: Option<&Path>, threads: usize) -> anyhow::Result<()> {
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
    let replays = match replay_model {
        Some(model) => Some(replay_members(&v, model, threads)?),
        None => None,
    };
    let refuted_winner = replays.as_ref().is_some_and(|r| {
        v.verdict.marks.iter().any(|(p, m)| *m == Mark::Agreed && r.get(p).is_some_and(|x| !x.is_valid()))
    });
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
            "replay": replays.as_ref().map(|r| r.iter().map(|(p, x)| (p.to_string(), serde_json::json!({
                "produced_by_model": x.is_valid(),
                "divergence": x.divergence,
            }))).collect::<BTreeMap<_, _>>()),
            "overturned": replays.as_ref().map(|_| refuted_winner),
        });
        println!("{out}");
        if refuted_winner {
            bail!("FRAUD: the finalized output is not what the model produces");
        }
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
            Mark::Declined => "declined",
        };
        let replayed = match replays.as_ref().map(|r| r.get(peer)) {
            None => String::new(),
            Some(None) => "  (revealed nothing to replay)".into(),
            Some(Some(r)) => match &r.divergence {
                None => "  replay: the model produces its output".into(),
                Some(d) => format!("  replay: REFUTED {d}"),
            },
        };
        println!("  {peer}  {mark:<9} {paid} credits{replayed}");
    }
    if replays.is_some() {
        if refuted_winner {
            bail!("FRAUD: the finalized output is not what the model produces; the members who revealed it lied");
        }
        println!("replay: every finalized output is what the model produces");
    }
    Ok(())
}

/// Replay every member's revealed output (each distinct output once) on the CPU.
fn replay_members(v: &VerifiedVerdict, model: &Path, threads: usize) -> anyhow::Result<BTreeMap<PeerId, Replay>> {
    let backend = Arc::new(sampo_kernels::CpuBackend::new(threads)?);
    let m = LoadedModel::load(model, None, 0, backend).with_context(|| format!("loading {}", model.display()))?;
    if m.id != v.spec.model {
        bail!("{} is model {}, but the task ran model {}", model.display(), m.id, v.spec.model);
    }
    let prompt = m.prompt_tokens(&v.spec.prompt)?;
    let params = m.sampling(&v.spec);
    let mut by_output: BTreeMap<&[u32], Replay> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (peer, tokens) in &v.opened {
        let r = match by_output.get(tokens.as_slice()) {
            Some(r) => r.clone(),
            None => {
                let r = m.engine.replay(&prompt, tokens, &params)?;
                by_output.insert(tokens, r.clone());
                r
            }
        };
        out.insert(*peer, r);
    }
    Ok(out)
}
