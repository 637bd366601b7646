//! Fuzzes the replay decoder and the engine behind it: arbitrary bytes, split into lines, must
//! never panic, and every line must get exactly one `done`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Start every input with a market so that order commands reach the engine, not only the
    // decoder's "unknown market" path.
    let mut input = br#"{"cmd":"market","market":"BTC-USDT","tick":"0.01","lot":"0.001","payment_methods":["sepa","wise"]}"#.to_vec();
    input.push(b'\n');
    input.extend_from_slice(data);
    let mut output = Vec::new();
    let lines = cli::replay::run(&input[..], &mut output).expect("writing to a Vec cannot fail");
    let text = String::from_utf8(output).expect("output is UTF-8");
    let done = text.lines().filter(|l| l.starts_with(r#"{"event":"done""#)).count();
    assert_eq!(done as u64, lines);
});
