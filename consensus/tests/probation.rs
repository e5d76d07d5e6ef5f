//! Sybils on probation (DESIGN.md, "Trust model", promise 5): fresh keys weigh little,
//! hold a minority of any committee's seats, and cannot vouch for each other.

use sampo_consensus::sim::{SimNet, reference_output, sybil_farm};
use sampo_consensus::*;

fn seed() -> TaskId {
    TaskId(Hash32::of(b"seed"))
}

fn listed(i: u8, probation: bool) -> Listed {
    Listed { probation, ..Listed::new(NodeKey::from_seed([i; 32]).peer_id(), 1.0) }
}

#[test]
fn probation_nodes_never_hold_a_quorum() {
    // Ten Sybils on probation outweigh two established nodes, and still get one seat of three.
    let mut list: Vec<Listed> = (1..=10).map(|i| Listed { weight: 100.0, ..listed(i, true) }).collect();
    list.extend((20..22).map(|i| listed(i, false)));
    for attempt in 0..3u8 {
        let size = committee_size(3, attempt);
        let cap = max_probation_seats(size);
        let committee = select(&seed(), attempt, &list, size, cap);
        let on_probation = committee.iter().filter(|p| list.iter().any(|c| c.peer == **p && c.probation)).count();
        assert!(on_probation < quorum(size), "attempt {attempt}: {on_probation} of {size}");
        assert_eq!(check_committee(&seed(), attempt, &list, cap, &committee), Ok(()));
    }
    // A coordinator that seats two Sybils of three is refused by members and verifiers.
    let sybils: Vec<PeerId> = list.iter().filter(|c| c.probation).map(|c| c.peer).collect();
    let established = list.iter().find(|c| !c.probation).map(|c| c.peer).expect("one");
    let stacked = vec![sybils[0], sybils[1], established];
    assert!(check_committee(&seed(), 0, &list, max_probation_seats(3), &stacked).is_err());
    // Only probation nodes: no committee can be seated (a fresh Sybil farm alone serves nothing).
    let farm: Vec<Listed> = (1..=10).map(|i| listed(i, true)).collect();
    assert_eq!(select(&seed(), 0, &farm, 3, max_probation_seats(3)).len(), 1);
}

#[test]
fn one_seat_per_network_prefix() {
    let mut list: Vec<Listed> = (1..=6).map(|i| Listed { group: 7, ..listed(i, false) }).collect();
    list.extend((10..13).map(|i| listed(i, false)));
    let committee = select(&seed(), 0, &list, 3, 1);
    let grouped = committee.iter().filter(|p| list.iter().any(|c| c.peer == **p && c.group == 7)).count();
    assert!(grouped <= 1, "{grouped} seats for one /24");
    assert_eq!(check_committee(&seed(), 0, &list, 1, &committee), Ok(()));
    let crowded: Vec<PeerId> = list.iter().filter(|c| c.group == 7).take(3).map(|c| c.peer).collect();
    assert!(check_committee(&seed(), 0, &list, 1, &crowded).is_err());
}

#[test]
fn a_fresh_key_starts_at_the_probation_weight() {
    let p = ReputationParams::default();
    let fresh = Reputation::default();
    assert!(fresh.on_probation(&p));
    assert!((fresh.weight_at(0, &p, false) - p.probation_weight).abs() < 1e-12);
    assert_eq!(fresh.weight_at(0, &p, true), 1.0, "trusted peers skip probation");
    let mut earned = fresh.clone();
    for _ in 0..p.probation_rounds {
        earned.record(Mark::Agreed, 0, &p);
        earned.record_vouched();
    }
    assert!(!earned.on_probation(&p));
    assert_eq!(earned.weight_at(0, &p, false), 1.0);
    // Agreed marks alone (self-dealt or unpaid rounds) end nobody's probation.
    let mut farmed = fresh;
    for _ in 0..10_000 {
        farmed.record(Mark::Agreed, 0, &p);
    }
    assert!(farmed.on_probation(&p));
}

/// Sybils coordinating rounds for each other, paid or not, earn nothing in an honest
/// node's view; the same work in an honest coordinator's rounds does.
#[test]
fn self_dealt_rounds_vouch_for_nobody() {
    let mut net = SimNet::new(4, RoundParams::default(), |_| Behaviour::Honest);
    net.verdicts_to_all = false;
    let farm: Vec<usize> = (0..4).map(|_| net.add_node(Behaviour::Honest)).collect();
    let farm_peers: Vec<PeerId> = farm.iter().map(|i| net.peer(*i)).collect();
    // The farm's coordinator lists only its own keys, flagged established.
    for _ in 0..30 {
        let spec = net.spec(farm[0], 3, 0);
        let list: Vec<Candidate> = farm
            .iter()
            .map(|i| Candidate {
                peer: net.peer(*i),
                models: vec![net.model],
                price_per_1k: 0,
                free_slots: 4,
                score: 1.0,
                banned: false,
                probation: false,
                group: 0,
            })
            .collect();
        let now = net.now_ms;
        let (_, actions) = net.nodes[farm[0]].consensus.submit(spec, None, &list, now).expect("submit");
        net.act(farm[0], actions);
        net.run(60_000);
    }
    for honest in 0..4 {
        for p in &farm_peers {
            let r = net.nodes[honest].view.get(p).cloned().unwrap_or_default();
            assert_eq!(r.vouched, 0, "node {honest} credits a self-dealt agreement");
            assert!(!net.established(honest, p));
        }
    }
    // Seats in honest nodes' paid rounds do count (that is how a newcomer graduates).
    for t in 0..200 {
        let c = t % 4;
        let spec = net.spec(c, 3, 0);
        let expected = reference_output(&spec);
        let task = net.submit(c, spec).expect("submit");
        net.run(60_000);
        assert_eq!(net.outcome(c, &task), Some(&Outcome::Finalized { output: expected }));
    }
    let vouched: u64 = farm_peers.iter().map(|p| net.nodes[0].view.get(p).map_or(0, |r| r.vouched)).sum();
    assert!(vouched > 0, "honest rounds vouch for newcomers that agree");
}

/// 30 % of identities are a colluding Sybil farm of fresh keys: it holds less than its
/// share of seats and never finalizes a wrong output in an honest node's task.
#[test]
fn a_sybil_farm_holds_few_seats_and_finalizes_nothing_wrong() {
    let windows = sybil_farm(14, 6, 300, 3, 100);
    let wrong: usize = windows.iter().map(|w| w.finalized_wrong).sum();
    let honest: usize = windows.iter().map(|w| w.finalized_honest).sum();
    assert_eq!(wrong, 0, "{windows:?}");
    assert!(honest >= 290, "{windows:?}");
    for w in &windows {
        assert!(w.sybil_seat_share < 0.30, "{w:?}");
    }
}
