//! `sampo verify` on real evidence from the consensus simulator, honest and forged.

mod common;

use common::sampo;
use sampo_consensus::sim::SimNet;
use sampo_consensus::{Behaviour, EvidenceBundle, Mark, RoundParams, SignedEnvelope, Verdict};

fn bundle() -> (SimNet, EvidenceBundle) {
    let mut net =
        SimNet::new(3, RoundParams::default(), |i| if i == 2 { Behaviour::WrongOutput } else { Behaviour::Honest });
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec).expect("submit");
    net.run(120_000);
    let v = net.verdicts(0, &task)[0].clone();
    (net, EvidenceBundle::new(&v))
}

#[test]
fn verifies_an_honest_bundle_and_names_what_a_forged_one_gets_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, bundle) = bundle();
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec_pretty(&bundle).expect("json")).expect("write");
    let out = sampo().arg("verify").arg(&good).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("VALID"), "{stdout}");
    assert!(stdout.contains("finalized"), "{stdout}");

    let out = sampo().arg("verify").arg("--json").arg(&good).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(v["outcome"], "finalized");
    assert_eq!(v["valid"], true);

    // The coordinator re-signs a verdict that clears every member of blame.
    let mut lie: Verdict = bundle.verdict.open().expect("open");
    for (_, m) in &mut lie.marks {
        *m = Mark::Agreed;
    }
    let forged =
        EvidenceBundle { verdict: SignedEnvelope::seal(&net.nodes[0].key, &lie).expect("seal"), ..bundle.clone() };
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&forged).expect("json")).expect("write");
    let out = sampo().arg("verify").arg(&bad).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("INVALID") && stderr.contains("marks"), "{stderr}");

    // A flipped byte breaks a signature.
    let mut text = serde_json::to_string(&bundle).expect("json");
    let at = text.len() - 10;
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    text.replace_range(at..at + 1, flipped);
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, text).expect("write");
    let out = sampo().arg("verify").arg(&broken).output().expect("run");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());

    let out = sampo().arg("verify").arg(dir.path().join("missing.json")).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
}
