//! Measures `policy::json_tape` against `serde_json::Value` on 1 MiB
//! bodies of the shapes that cost each the most per byte: bytes allocated
//! at the peak of the parse, bytes kept, parse time, and parse + validate
//! time with `jsonschema`. A counting allocator, per thread, gives the
//! peaks. Run it optimised:
//!
//! ```sh
//! cargo run --release --example json_tape_bench
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::time::Duration;

use portcullis::policy::json_tape::{Document, Tape};
use serde_json::{Value, json};

/// The system allocator, counting this thread's live bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(by: usize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + by);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

fn shrank(by: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(by)));
}

// SAFETY: every call goes straight to `System` with the caller's arguments;
// the counting touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `System::alloc`, whose contract the caller keeps.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from `alloc` with this `layout`.
        unsafe { System.dealloc(pointer, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: as for `System::realloc`, whose contract the caller keeps.
        let moved = unsafe { System.realloc(pointer, layout, size) };
        if !moved.is_null() {
            shrank(layout.size());
            grew(size);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `work` beyond what was live before it,
/// and what it returns.
fn peak_of<T>(work: impl FnOnce() -> T) -> (usize, T) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let result = work();
    (PEAK.with(Cell::get) - before, result)
}

/// CPU time this thread has run, from the scheduler: unlike the wall
/// clock, not inflated when other processes share the cores. It advances
/// by whole ticks on some kernels, hence the long runs in [`cpu_per_run`].
fn cpu_now() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let nanos = stat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(nanos)
}

/// CPU time per run of `work`, over runs adding up to half a second.
fn cpu_per_run(mut work: impl FnMut()) -> Duration {
    work();
    let start = cpu_now();
    let mut runs = 0_u32;
    while runs < 3 || cpu_now() - start < Duration::from_millis(500) {
        work();
        runs += 1;
    }
    (cpu_now() - start) / runs
}

fn repeat_to(unit: &str, size: usize, open: &str, close: &str) -> String {
    let mut text = String::with_capacity(size + unit.len() + 2);
    text.push_str(open);
    while text.len() + unit.len() + close.len() < size {
        if text.len() > open.len() {
            text.push(',');
        }
        text.push_str(unit);
    }
    text.push_str(close);
    text
}

fn shapes() -> Vec<(&'static str, String)> {
    const MIB: usize = 1 << 20;
    let nested = format!("{}0{}", "[".repeat(126), "]".repeat(126));
    let sixteen: Vec<String> = (b'a'..=b'p')
        .map(|c| format!("\"{}\":0", char::from(c)))
        .collect();
    let distinct: Vec<String> = (0..MIB / 9).map(|i| format!("\"{i:x}\":0")).collect();
    let record = r#"{"id":12345,"name":"Ada Lovelace","email":"ada@example.com","tags":["a","b"],"score":9.5,"active":true}"#;
    vec![
        ("[{\"a\":1},...]", repeat_to("{\"a\":1}", MIB, "[", "]")),
        ("records of 6 fields", repeat_to(record, MIB, "[", "]")),
        ("[0,0,...]", repeat_to("0", MIB, "[", "]")),
        ("[[],[],...]", repeat_to("[]", MIB, "[", "]")),
        ("[[0],[0],...]", repeat_to("[0]", MIB, "[", "]")),
        (
            "126 nested arrays, repeated",
            repeat_to(&nested, MIB, "[", "]"),
        ),
        (
            "arrays padded to 32 bytes",
            repeat_to(&format!("[{}0]", " ".repeat(29)), MIB, "[", "]"),
        ),
        (
            "objects of 16 one-letter names",
            repeat_to(&format!("{{{}}}", sixteen.join(",")), MIB, "[", "]"),
        ),
        ("{\"\":0,\"\":0,...}", repeat_to("\"\":0", MIB, "{", "}")),
        (
            "[{\"\":0,\"\":0},...]",
            repeat_to("{\"\":0,\"\":0}", MIB, "[", "]"),
        ),
        (
            "one object, distinct names",
            format!("{{{}}}", distinct.join(",")),
        ),
        ("[\"\\u00e9\",...]", repeat_to("\"\\u00e9\"", MIB, "[", "]")),
        (
            "one string of \\n escapes",
            format!("[\"{}\"]", "\\n".repeat(MIB / 2 - 2)),
        ),
    ]
}

fn main() {
    // What a schema route typically asks: types and a few properties.
    let schema = json!({
        "type": ["array", "object"],
        "items": {
            "type": ["object", "array", "number", "string"],
            "properties": {"a": {"type": "integer"}, "id": {"type": "integer"}, "email": {"format": "email"}},
            "items": {"type": ["number", "array"]}
        },
        "additionalProperties": {"type": ["number", "string"]}
    });
    let by_value = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles");
    let by_tape = jsonschema::options_for::<Tape>()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles");

    println!(
        "| shape | body | Value peak | tape peak | tape kept | Value parse | tape parse | Value validate | tape validate | Value both | tape both | verdict |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    // `cargo run --release --example json_tape_bench -- nested` runs only
    // the shapes whose name has "nested" in it.
    let only = std::env::args().nth(1).unwrap_or_default();
    for (shape, text) in shapes()
        .into_iter()
        .filter(|(shape, _)| shape.contains(&only))
    {
        let size = text.len() as f64;
        let ratio = |bytes: usize| format!("{:.2}×", bytes as f64 / size);
        let (value_peak, value) = peak_of(|| serde_json::from_str::<Value>(&text).expect("JSON"));
        drop(value);
        let (tape_peak, document) = peak_of(|| Document::parse(&text).expect("JSON"));
        let kept = document.heap_bytes();
        drop(document);

        let value_parse = cpu_per_run(|| {
            black_box(serde_json::from_str::<Value>(black_box(&text)).expect("JSON"));
        });
        let tape_parse = cpu_per_run(|| {
            black_box(Document::parse(black_box(&text)).expect("JSON"));
        });
        let value = serde_json::from_str::<Value>(&text).expect("JSON");
        let value_validate = cpu_per_run(|| {
            black_box(by_value.iter_errors(black_box(&value)).take(10).count());
        });
        drop(value);
        let document = Document::parse(&text).expect("JSON");
        let tape_validate = cpu_per_run(|| {
            black_box(
                by_tape
                    .iter_errors(black_box(document.root()))
                    .take(10)
                    .count(),
            );
        });
        drop(document);
        let mut valid = (false, false);
        let value_total = cpu_per_run(|| {
            let value: Value = serde_json::from_str(black_box(&text)).expect("JSON");
            valid.0 = by_value.iter_errors(&value).take(10).count() == 0;
        });
        let tape_total = cpu_per_run(|| {
            let document = Document::parse(black_box(&text)).expect("JSON");
            valid.1 = by_tape.iter_errors(document.root()).take(10).count() == 0;
        });
        assert_eq!(valid.0, valid.1, "{shape}: verdicts differ");
        println!(
            "| {shape} | {} KiB | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            text.len() / 1024,
            ratio(value_peak),
            ratio(tape_peak),
            ratio(kept),
            value_parse.as_secs_f64() * 1e3,
            tape_parse.as_secs_f64() * 1e3,
            value_validate.as_secs_f64() * 1e3,
            tape_validate.as_secs_f64() * 1e3,
            value_total.as_secs_f64() * 1e3,
            tape_total.as_secs_f64() * 1e3,
            if valid.1 { "valid" } else { "invalid" },
        );
    }

    // Every item fails: `iter_errors` collects every error before the
    // first ten are taken, whatever the representation.
    let failing = json!({"items": {"properties": {"a": {"type": "string"}}}});
    let by_value = jsonschema::options()
        .build(&failing)
        .expect("the schema compiles");
    let by_tape = jsonschema::options_for::<Tape>()
        .build(&failing)
        .expect("the schema compiles");
    let text = repeat_to("{\"a\":1}", 1 << 20, "[", "]");
    let size = text.len() as f64;
    let (value_peak, value_errors) = peak_of(|| {
        let value: Value = serde_json::from_str(&text).expect("JSON");
        by_value.iter_errors(&value).take(10).count()
    });
    let (tape_peak, tape_errors) = peak_of(|| {
        let document = Document::parse(&text).expect("JSON");
        by_tape.iter_errors(document.root()).take(10).count()
    });
    assert_eq!(value_errors, tape_errors);
    println!(
        "\nEvery one of the 131,071 items of [{{\"a\":1}},...] failing: peak {:.2}× the body with a Value, {:.2}× with the tape",
        value_peak as f64 / size,
        tape_peak as f64 / size
    );
}
