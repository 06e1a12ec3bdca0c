//! Times `RouteSchema::judge` on one schema and one body, beside what it is
//! made of and what it replaced: the dense document (bodies up to
//! `DENSE_MAX_BYTES`), the tape (larger bodies), and a `serde_json::Value`
//! with the stock validator, each parsed and validated per iteration. With
//! mimalloc, as the proxy runs. Run it optimised:
//!
//! ```sh
//! cargo run --release --example schema_bench
//! cargo run --release --example schema_bench -- SCHEMA.json BODY.json [ITERATIONS [ONLY]]
//! ```
//!
//! Without arguments: an order schema (`items`: objects of a `sku` string
//! with a `pattern` and a `qty` integer with a `minimum`, no other
//! properties) on bodies of such items of 1 KiB and 64 KiB, the figures
//! `policy::schema` quotes. Otherwise the given schema and body, which the
//! schema must accept.
//!
//! Each time is the best of five rounds' means, so that another process
//! on the machine skews it less. ONLY, a word of a measurement's name
//! (`judge`, `dense`, `tape`, `serde_json`), runs only the measurements
//! named with it, for `perf record`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use portcullis::policy::json_dense::{self, Dense};
use portcullis::policy::json_tape::{self, Tape};
use portcullis::policy::schema::RouteSchema;
use serde_json::Value;

#[global_allocator]
static GLOBAL: portcullis::allocator::Mimalloc = portcullis::allocator::Mimalloc;

/// Rounds timed; the best one's mean is reported.
const ROUNDS: usize = 5;

/// The best of [`ROUNDS`] mean times of `run` over `iterations`, after a
/// tenth as many to warm up.
fn time(iterations: u32, mut run: impl FnMut()) -> Duration {
    for _ in 0..iterations / 10 {
        run();
    }
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                run();
            }
            start.elapsed() / iterations.max(1)
        })
        .min()
        .unwrap_or_default()
}

/// The schema measured without arguments.
const ORDER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["items"],
  "additionalProperties": false,
  "properties": {
    "items": {
      "type": "array",
      "minItems": 1,
      "items": {
        "type": "object",
        "required": ["sku", "qty"],
        "additionalProperties": false,
        "properties": {
          "sku": { "type": "string", "pattern": "^[A-Z]{3}-[0-9]+$" },
          "qty": { "type": "integer", "minimum": 1 }
        }
      }
    },
    "note": { "type": "string" }
  }
}"#;

/// An order of at most `size` bytes: `{"items":[{"sku":"AAA-10000","qty":1},...]}`.
fn order(size: usize) -> Vec<u8> {
    let mut body = String::from(r#"{"items":["#);
    for n in 0.. {
        let letter = |shift: usize| char::from(b'A' + u8::try_from((n >> shift) % 26).unwrap_or(0));
        let item = format!(
            r#"{{"sku":"{}{}{}-{}","qty":{}}}"#,
            letter(0),
            letter(1),
            letter(2),
            10_000 + n,
            n % 9 + 1
        );
        if body.len() + item.len() + 3 > size {
            break;
        }
        if n > 0 {
            body.push(',');
        }
        body.push_str(&item);
    }
    body.push_str("]}");
    body.into_bytes()
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        let schema: Value = serde_json::from_str(ORDER_SCHEMA).map_err(|e| e.to_string())?;
        for size in [1 << 10, 1 << 16] {
            bench("order", &schema, &order(size), 2000, None)?;
            println!();
        }
        return Ok(());
    }
    let [schema_file, body_file, rest @ ..] = args.as_slice() else {
        return Err("usage: schema_bench [SCHEMA.json BODY.json [ITERATIONS [ONLY]]]".into());
    };
    let iterations: u32 = match rest.first() {
        Some(count) => count.parse().map_err(|e| format!("{count}: {e}"))?,
        None => 2000,
    };
    let read = |file: &str| std::fs::read(file).map_err(|e| format!("{file}: {e}"));
    let schema: Value =
        serde_json::from_slice(&read(schema_file)?).map_err(|e| format!("{schema_file}: {e}"))?;
    let body = read(body_file)?;
    bench(
        schema_file,
        &schema,
        &body,
        iterations,
        rest.get(1).map(String::as_str),
    )
}

/// Measures and prints each way of judging `body` against `schema`.
fn bench(
    name: &str,
    schema: &Value,
    body: &[u8],
    iterations: u32,
    only: Option<&str>,
) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body: {e}"))?;
    let route = RouteSchema::compile(name, schema)?;
    route
        .judge(body)
        .map_err(|e| format!("the schema refuses the body: {e:?}"))?;
    let dense = jsonschema::options_for::<Dense>()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())?;
    let tape = jsonschema::options_for::<Tape>()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())?;
    let value = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())?;

    println!("{name}: {} bytes, {iterations} iterations", body.len());
    // Runs and reports `measure` unless another measurement was asked for.
    let report = |what: &str, measure: &dyn Fn() -> Duration| {
        if only.is_none_or(|only| what.contains(only)) {
            println!("{:>12.2?}  {what}", measure());
        }
    };
    report("judge (what the route does)", &|| {
        time(iterations, || {
            black_box(route.judge(black_box(body)).is_ok());
        })
    });
    if let Some(document) = json_dense::Document::parse(text) {
        println!("{:>12}  dense document, bytes held", document.heap_bytes());
        report("dense parse", &|| {
            time(iterations, || {
                black_box(json_dense::Document::parse(black_box(text)).is_some());
            })
        });
        report("dense validate", &|| {
            time(iterations, || {
                black_box(dense.is_valid(black_box(&document).root()));
            })
        });
    } else {
        println!("(the dense pass does not take this body)");
    }
    if let Ok(document) = json_tape::Document::parse(text) {
        println!("{:>12}  tape, bytes held", document.heap_bytes());
        report("tape parse", &|| {
            time(iterations, || {
                black_box(json_tape::Document::parse(black_box(text)).is_ok());
            })
        });
        report("tape validate", &|| {
            time(iterations, || {
                black_box(tape.is_valid(black_box(&document).root()));
            })
        });
    }
    let tree: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    report("serde_json::Value parse", &|| {
        time(iterations, || {
            black_box(serde_json::from_str::<Value>(black_box(text)).is_ok());
        })
    });
    report("serde_json::Value validate", &|| {
        time(iterations, || {
            black_box(value.is_valid(black_box(&tree)));
        })
    });
    Ok(())
}
