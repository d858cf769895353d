//! Property tests for the parts that take hostile input: mount options and bucket keys.

use proptest::prelude::*;

use crate::cli::parse_args;
use crate::config::parse_source;
use crate::fs::dir::{invalid_name_reason, Listing, WarnOnce};
use crate::store::{ListPage, ObjectMeta};

fn key_strategy() -> impl Strategy<Value = String> {
    // Keys built from the characters that make trouble: separators, dots, controls, unicode.
    let piece = prop_oneof![
        Just("/".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("//".to_string()),
        Just("_$folder$".to_string()),
        Just("\t".to_string()),
        Just("\u{7f}".to_string()),
        Just("é".to_string()),
        "[a-zA-Z0-9 ]{1,8}",
        "[a-z]{250,300}",
    ];
    prop::collection::vec(piece, 1..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Whatever the keys, a listing yields only valid POSIX names that lead back to the keys.
    #[test]
    fn listing_names_are_always_valid(keys in prop::collection::vec(key_strategy(), 0..40), prefix in prop_oneof![Just(String::new()), Just("p/".to_string())]) {
        let warn = WarnOnce::default();
        let mut listing = Listing::default();
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        for k in &keys {
            let key = format!("{prefix}{k}");
            let rest = &key[prefix.len()..];
            match rest.find('/') {
                Some(i) => prefixes.push(format!("{prefix}{}", &rest[..=i])),
                None => objects.push(ObjectMeta { key, ..Default::default() }),
            }
        }
        listing.add_page(&prefix, ListPage { objects, common_prefixes: prefixes, next_token: None }, &warn);
        for name in listing.entries.keys() {
            prop_assert!(invalid_name_reason(name).is_none(), "bad name {:?}", name);
            let full = format!("{prefix}{name}");
            prop_assert!(
                keys.iter().any(|k| format!("{prefix}{k}").starts_with(&full)),
                "{:?} does not lead back to a key", name
            );
        }
    }

    /// The option parser never panics, and accepts or names what it refuses.
    #[test]
    fn option_parser_never_panics(opts in "[a-z_=,0-9./:-]{0,60}", extra in prop::collection::vec("[-a-zA-Z0-9=_.]{0,12}", 0..4)) {
        let mut args = vec!["s3mount".to_string(), "bucket".to_string(), "/mnt".to_string(), "-o".to_string(), opts];
        args.extend(extra);
        let _ = parse_args(&args);
    }

    /// Every long option has an equivalent -o form with underscores.
    #[test]
    fn o_form_equals_long_form(ttl in 0u32..100_000, mem in 16u64..4096) {
        let a = parse_args(&["s3mount".into(), "b".into(), "/m".into(), "-o".into(), format!("metadata_ttl={ttl},max_memory={mem}MiB,force_path_style")]).unwrap();
        let b = parse_args(&["s3mount".into(), "b".into(), "/m".into(), format!("--metadata-ttl={ttl}"), format!("--max-memory={mem}MiB"), "--force-path-style".into()]).unwrap();
        prop_assert_eq!(a.metadata_ttl, b.metadata_ttl);
        prop_assert_eq!(a.max_memory, b.max_memory);
        prop_assert_eq!(a.force_path_style, b.force_path_style);
    }

    /// Sources parse to a bucket and a prefix that is empty or a clean `a/b/` path.
    #[test]
    fn sources_parse_cleanly(src in "(s3://)?[a-z0-9.:/_-]{0,40}") {
        if let Ok((bucket, prefix)) = parse_source(&src) {
            prop_assert!(!bucket.is_empty());
            prop_assert!(prefix.is_empty() || (prefix.ends_with('/') && !prefix.starts_with('/')));
            prop_assert!(!prefix.contains("//"));
            prop_assert!(prefix.split('/').all(|c| c != "." && c != ".."));
        }
    }
}
