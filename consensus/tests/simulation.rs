//! 1,000 tasks over 20 nodes, 20 % of them colluding liars: reputation must push the
//! liars off committees.

use sampo_consensus::sim::reputation_simulation;

#[test]
fn liars_lose_their_seats_over_time() {
    let windows = reputation_simulation(20, 4, 1000, 3, 10);
    assert_eq!(windows.len(), 100);
    let first = &windows[0];
    let last = &windows[99];
    for w in windows.iter().take(10) {
        eprintln!(
            "tasks {:4}..{:4}: liar seat share {:5.1} %, honest {:3}, wrong {:2}, liars banned {}",
            w.first_task,
            w.first_task + w.tasks,
            100.0 * w.liar_seat_share,
            w.finalized_honest,
            w.finalized_wrong,
            w.liars_banned_at_end
        );
    }
    // 4 of 20 nodes hold ~20 % of seats by chance at first.
    let early: f64 = windows[..5].iter().map(|w| w.liar_seat_share).sum::<f64>() / 5.0;
    assert!(early > 0.04, "liars do get seats before they are caught: {first:?}");
    let late: f64 = windows[50..].iter().map(|w| w.liar_seat_share).sum::<f64>() / 50.0;
    assert!(late < early / 4.0, "late share {late}");
    assert_eq!(last.liars_banned_at_end, 4, "every liar banned");
    assert_eq!(last.finalized_wrong, 0, "no wrong output finalizes once liars are out");
}
