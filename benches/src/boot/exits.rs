//! Our VMM's exits in a boot: the list from keystone's timings JSON (kind,
//! count, handling time), a total, and the short line the stderr table
//! shows under each of our runs.
//!
//! Entries whose kind starts with `coalesced ` are guest writes KVM
//! queued in its coalesced ring instead of exiting: they are listed, but
//! not added to the exit total.

use serde_json::{json, Value};

/// How many kinds the stderr line names.
const LINE_KINDS: usize = 4;

/// True for an entry that is not an exit (a write KVM coalesced).
fn is_coalesced(entry: &Value) -> bool {
    entry["kind"]
        .as_str()
        .is_some_and(|k| k.starts_with("coalesced "))
}

/// The total of `exits` (keystone's `exits` list): how many, and the
/// VMM's handling time in ms. `null` when there is no list.
pub fn total(exits: &Value) -> Value {
    let Some(list) = exits.as_array() else {
        return Value::Null;
    };
    let (mut count, mut us) = (0u64, 0u64);
    for e in list.iter().filter(|e| !is_coalesced(e)) {
        count += e["count"].as_u64().unwrap_or(0);
        us += e["handling_us"].as_u64().unwrap_or(0);
    }
    json!({ "count": count, "handling_ms": us as f64 / 1000.0 })
}

/// `exits 31234 (4.1 s): io serial 29692 3.8 s, ...` for a run record,
/// or `None` when it has no exit list.
pub fn line(record: &Value) -> Option<String> {
    let list = record["vmm_reported"]["exits"].as_array()?;
    let t = total(&record["vmm_reported"]["exits"]);
    let mut kinds: Vec<&Value> = list.iter().collect();
    kinds.sort_by_key(|e| std::cmp::Reverse(e["count"].as_u64().unwrap_or(0)));
    let named: Vec<String> = kinds
        .iter()
        .take(LINE_KINDS)
        .map(|e| {
            format!(
                "{} {} {}",
                e["kind"].as_str().unwrap_or("?"),
                e["count"].as_u64().unwrap_or(0),
                seconds(e["handling_us"].as_u64().unwrap_or(0) as f64 / 1e6)
            )
        })
        .collect();
    Some(format!(
        "exits {} ({}): {}",
        t["count"].as_u64().unwrap_or(0),
        seconds(t["handling_ms"].as_f64().unwrap_or(0.0) / 1e3),
        named.join(", ")
    ))
}

fn seconds(s: f64) -> String {
    if s >= 0.1 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Value {
        json!({ "vmm_reported": { "exits": [
            { "kind": "io serial", "count": 29692, "handling_us": 3_800_000 },
            { "kind": "io i8042", "count": 3, "handling_us": 40 },
            { "kind": "coalesced io serial", "count": 15000, "handling_us": 90_000 },
            { "kind": "mmio virtio-fs root", "count": 120, "handling_us": 2_500 },
            { "kind": "hlt", "count": 1, "handling_us": 1 },
        ]}})
    }

    #[test]
    fn the_total_leaves_coalesced_writes_out() {
        let t = total(&record()["vmm_reported"]["exits"]);
        assert_eq!(t["count"], 29692 + 3 + 120 + 1);
        assert_eq!(t["handling_ms"], 3802.541);
        assert_eq!(total(&Value::Null), Value::Null);
    }

    #[test]
    fn the_line_names_the_busiest_kinds() {
        let l = line(&record()).unwrap();
        assert!(
            l.starts_with("exits 29816 (3.8 s): io serial 29692 3.8 s, "),
            "{l}"
        );
        assert!(l.contains("coalesced io serial 15000 90.0 ms"), "{l}");
        assert!(l.contains("mmio virtio-fs root 120 2.5 ms"), "{l}");
        assert!(!l.contains("hlt"), "only {LINE_KINDS} kinds: {l}");
        assert_eq!(line(&json!({ "vmm_reported": {} })), None);
    }
}
