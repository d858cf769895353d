//! The S3 store against a real server (Garage): listing with pagination, ranged GETs, HEAD with
//! metadata, conditional GETs, and error mapping.

mod support;

use std::time::Duration;

use s3mount::store::s3::{S3Settings, S3Store};
use s3mount::store::{ByteRange, ObjectStore, PutOptions, StoreError};
use support::*;

fn settings(server: &S3Server, bucket: &str) -> S3Settings {
    S3Settings {
        bucket: bucket.into(),
        endpoint_url: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        force_path_style: true,
        profile: None,
        no_sign_request: false,
        max_attempts: 2,
        connect_timeout: Duration::from_secs(2),
        credentials: None,
        ca_bundle: None,
        stall_timeout: Duration::from_secs(5),
        idle_buffers: 16 << 20,
        payload_signing: Default::default(),
    }
}

fn store(server: &S3Server, bucket: &str) -> S3Store {
    store_with(settings(server, bucket))
}

fn store_with(settings: S3Settings) -> S3Store {
    // The store reads credentials from the standard chain: the environment here.
    for (k, v) in server().env() {
        std::env::set_var(k, v);
    }
    rt().block_on(S3Store::connect(&settings)).expect("connect")
}

#[test]
fn list_paginates_and_groups() {
    let server = server();
    let bucket = server.new_bucket();
    for i in 0..25 {
        server.put(&bucket, &format!("dir/f{i:02}"), vec![b'x'; i]);
    }
    server.put(&bucket, "dir/sub/inner", "y");
    server.put(&bucket, "dir/marker/", "");
    let s = store(server, &bucket);
    let (objects, mut prefixes) = rt().block_on(async {
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut token = None;
        let mut pages = 0;
        loop {
            let p = s
                .list_page("dir/", Some("/"), token, Some(7))
                .await
                .expect("list");
            pages += 1;
            objects.extend(p.objects);
            prefixes.extend(p.common_prefixes);
            token = p.next_token;
            if token.is_none() {
                break;
            }
        }
        assert!(pages >= 4, "pagination used: {pages} pages");
        (objects, prefixes)
    });
    assert_eq!(objects.len(), 25);
    assert_eq!(objects[3].key, "dir/f03");
    assert_eq!(objects[3].size, 3);
    assert!(objects[3].etag.is_some());
    assert!(objects[3].last_modified.is_some());
    prefixes.sort();
    assert_eq!(prefixes, vec!["dir/marker/", "dir/sub/"]);
}

/// The walk ahead starts each of its key ranges with StartAfter (keys sorting between `p/a`
/// and `p/a/` included: they are not below `p/a/`).
#[test]
fn list_after_a_key() {
    let server = server();
    let bucket = server.new_bucket();
    let keys = [
        "p/a", "p/a-b/x", "p/a.c", "p/a/y", "p/b/z", "p/c", "q/other",
    ];
    for k in keys {
        server.put(&bucket, k, "v");
    }
    let s = store(server, &bucket);
    let got = rt().block_on(async {
        let first = s.list_page_after("p/", "p/a").await.expect("list after");
        assert!(first.common_prefixes.is_empty(), "no delimiter");
        first
    });
    let names: Vec<&str> = got.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(names, ["p/a-b/x", "p/a.c", "p/a/y", "p/b/z", "p/c"]);
}

#[test]
fn ranged_get_head_and_conditions() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(3 << 20, 1);
    server.put_with_meta(
        &bucket,
        "obj",
        body.clone(),
        &[("mode", "33188"), ("uid", "7")],
    );
    let s = store(server, &bucket);
    rt().block_on(async {
        let meta = s.head("obj").await.expect("head");
        assert_eq!(meta.size, body.len() as u64);
        assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33188"));
        assert_eq!(meta.metadata.get("uid").map(String::as_str), Some("7"));
        let etag = meta.etag.clone().expect("etag");
        let got = s
            .get_range("obj", ByteRange::new(1_000_000, 1_000_100), Some(&etag))
            .await
            .expect("get");
        assert_eq!(&got[..], &body[1_000_000..1_000_100]);
        // With the CRC32s of its pieces between multiples of 1 MiB, hashed as they arrive.
        let range = ByteRange::new(700_000, 2_500_000);
        let (got, crcs) = s
            .get_range_crcs("obj", range, Some(&etag), 1 << 20)
            .await
            .expect("get with crcs");
        assert_eq!(&got[..], &body[700_000..2_500_000]);
        assert_eq!(
            crcs,
            [700_000..1 << 20, 1 << 20..2 << 20, 2 << 20..2_500_000]
                .map(|r| crc32fast::hash(&body[r]))
        );
        // A range past the end is clipped.
        let tail = s
            .get_range(
                "obj",
                ByteRange::new(body.len() as u64 - 10, body.len() as u64 + 100),
                None,
            )
            .await
            .unwrap();
        assert_eq!(&tail[..], &body[body.len() - 10..]);
        let stale = s
            .get_range("obj", ByteRange::new(0, 10), Some("\"0123456789abcdef\""))
            .await;
        assert!(
            matches!(stale, Err(StoreError::PreconditionFailed(_))),
            "{stale:?}"
        );
        assert!(matches!(
            s.head("missing").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.get_range("missing", ByteRange::new(0, 1), None).await,
            Err(StoreError::NotFound(_))
        ));
        s.put(
            "small",
            bytes::Bytes::from_static(b"hello"),
            &PutOptions::default(),
            Some(crc32fast::hash(b"hello")),
        )
        .await
        .expect("put with crc32");
        assert_eq!(
            &s.get_range("small", ByteRange::new(0, 5), None)
                .await
                .unwrap()[..],
            b"hello"
        );
        s.delete("small").await.expect("delete");
        assert!(matches!(
            s.head("small").await,
            Err(StoreError::NotFound(_))
        ));
    });
}

#[test]
fn errors_are_classified() {
    let server = server();
    let s = store(server, "no-such-bucket-here");
    let r = rt().block_on(s.list_page("", Some("/"), None, Some(1)));
    assert!(matches!(r, Err(StoreError::NoSuchBucket(_))), "{r:?}");

    let bucket = server.new_bucket();
    let mut bad = settings(server, &bucket);
    bad.endpoint_url = Some(format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }));
    let s = rt().block_on(S3Store::connect(&bad)).unwrap();
    let r = rt().block_on(s.list_page("", Some("/"), None, Some(1)));
    assert!(matches!(r, Err(StoreError::Unreachable(_))), "{r:?}");
}

#[test]
fn multipart_objects_keep_a_full_object_crc32_and_report_part_sizes() {
    let server = server();
    let bucket = server.new_bucket();
    let s = store(server, &bucket);
    let part1 = pattern(5 << 20, 2);
    let part2 = pattern(1 << 20, 3);
    let whole: Vec<u8> = [part1.clone(), part2.clone()].concat();
    rt().block_on(async {
        let id = s
            .create_multipart("mp", &PutOptions::default(), true)
            .await
            .expect("create");
        let mut parts = Vec::new();
        for (n, body) in [(1, &part1), (2, &part2)] {
            let crc = crc32fast::hash(body);
            parts.push(
                s.upload_part("mp", &id, n, bytes::Bytes::from(body.clone()), Some(crc))
                    .await
                    .expect("part"),
            );
        }
        s.complete_multipart("mp", &id, parts, &Default::default())
            .await
            .expect("complete");
        let crc = s3mount::store::crc32_header(crc32fast::hash(&whole));
        let meta = s.head("mp").await.expect("head");
        // Garage and moto both keep FULL_OBJECT checksums; whatever is reported must be right.
        assert_eq!(
            meta.checksum_crc32.as_deref(),
            Some(crc.as_str()),
            "{:?}",
            server.kind
        );
        assert_eq!(s.part_size("mp", 1).await.unwrap(), 5 << 20);
        let (data, sum) = s.get_whole("mp", whole.len() as u64, None).await.unwrap();
        assert!(data == whole);
        if let Some(sum) = sum {
            assert_eq!(sum, crc);
        }
    });
}

#[test]
fn unsigned_payloads_are_accepted_and_their_crc32_still_checked() {
    use s3mount::store::s3::PayloadSigning;
    let server = server();
    let bucket = server.new_bucket();
    let mut set = settings(server, &bucket);
    set.payload_signing = PayloadSigning::Never;
    let s = store_with(set);
    let body = pattern(3 << 20, 9);
    rt().block_on(async {
        let crc = crc32fast::hash(&body);
        s.put(
            "one",
            bytes::Bytes::from(body.clone()),
            &PutOptions::default(),
            Some(crc),
        )
        .await
        .expect("unsigned put");
        let id = s
            .create_multipart("mp", &PutOptions::default(), true)
            .await
            .expect("create");
        let part = s
            .upload_part("mp", &id, 1, bytes::Bytes::from(body.clone()), Some(crc))
            .await
            .expect("unsigned part");
        s.complete_multipart("mp", &id, vec![part], &Default::default())
            .await
            .expect("complete");
        // A body that does not match its CRC32 is refused by a server that checks them
        // (Garage; moto checks none), signed payload or not.
        let wrong = s
            .put(
                "bad",
                bytes::Bytes::from(body.clone()),
                &PutOptions::default(),
                Some(crc ^ 1),
            )
            .await;
        if server.kind == Kind::Garage {
            assert!(wrong.is_err(), "a wrong CRC32 was accepted: {wrong:?}");
        }
    });
    assert_eq!(server.get(&bucket, "one").unwrap(), body);
    assert_eq!(server.get(&bucket, "mp").unwrap(), body);
    // auto: unsigned only over TLS, and only with a CRC32 to check.
    assert!(PayloadSigning::Auto.unsigned(true, true));
    assert!(!PayloadSigning::Auto.unsigned(false, true));
    assert!(!PayloadSigning::Auto.unsigned(true, false));
    assert!(!PayloadSigning::Always.unsigned(true, true));
    assert!(PayloadSigning::Never.unsigned(false, false));
}
