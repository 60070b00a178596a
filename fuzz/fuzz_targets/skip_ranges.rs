//! `--proxy-skip-range` / NO_PROXY parser: never panics, and what parses prints back into
//! something that parses to the same entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::policy::SkipRanges;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(parsed) = text.parse::<SkipRanges>() {
        let printed: Vec<String> = parsed.entries.iter().map(ToString::to_string).collect();
        let again: SkipRanges = printed.join(",").parse().expect("printed skip ranges must parse");
        assert_eq!(again.entries, parsed.entries);
        let _ = parsed.cidrs();
    }
});
