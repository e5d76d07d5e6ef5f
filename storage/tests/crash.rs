//! A writer killed with SIGKILL in the middle of a write loop loses no write it
//! acknowledged, and every batch lands whole or not at all.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sampo_storage::{Batch, Column, Record, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    payload: Vec<u8>,
}
impl Record for Entry {
    const COLUMN: Column = Column::Tasks;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Mirror(u64);
impl Record for Mirror {
    const COLUMN: Column = Column::Ledger;
}

const CHILD_ENV: &str = "SAMPO_STORAGE_CRASH_CHILD_DIR";
const ACKS_BEFORE_KILL: u64 = 150;

/// Not a test on its own: the child process the crash test spawns and kills.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let store = Store::open(std::path::Path::new(&dir)).expect("child open");
    for seq in 0u64.. {
        let key = seq.to_be_bytes();
        let mut b = Batch::new();
        b.put(&key, &Entry { seq, payload: vec![(seq % 251) as u8; 512] }).expect("enc");
        b.put(&key, &Mirror(seq)).expect("enc");
        store.commit(b).expect("commit");
        // Printed only after commit returned: this is the acknowledgement.
        println!("ACK {seq}");
    }
}

#[test]
fn sigkill_mid_write_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test exe");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_ack = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("ACK ") {
            last_ack = Some(n.trim().parse::<u64>().expect("ack number"));
            if last_ack >= Some(ACKS_BEFORE_KILL) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "writer too slow");
    }
    child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
    // Acknowledgements already in the pipe still count.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("ACK ") {
            last_ack = n.trim().parse::<u64>().ok().max(last_ack);
        }
    }
    let status = child.wait().expect("wait");
    assert!(!status.success(), "writer must have been killed, not exited");
    let last_ack = last_ack.expect("writer acknowledged nothing");

    let store = Store::open(dir.path()).expect("reopen after crash");
    for seq in 0..=last_ack {
        let key = seq.to_be_bytes();
        let e = store.get::<Entry>(&key).expect("read").unwrap_or_else(|| panic!("acknowledged write {seq} lost"));
        assert_eq!(e.seq, seq);
        assert_eq!(store.get::<Mirror>(&key).expect("read"), Some(Mirror(seq)), "batch {seq} torn");
    }
    // Anything beyond the last ack is either whole or absent.
    let entries = store.count::<Entry>().expect("count");
    let mirrors = store.count::<Mirror>().expect("count");
    assert_eq!(entries, mirrors, "a batch landed half");
    assert!(entries as u64 > last_ack);
}
