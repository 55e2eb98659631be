use super::*;
use rand::SeedableRng;

fn ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}

fn trust() -> Trust {
    Trust::restore(LoadedTrust::default(), 0)
}

#[test]
fn token_is_stored_hashed_and_single_use() {
    let mut t = trust();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (token, rec, write) =
        t.create_token(1000, 60_000, 1, Some("rack 2".into()), None, &mut rng);
    let (id, secret) = token.split_once('.').unwrap();
    assert_eq!(id, rec.id);
    assert_eq!(secret.len(), 64);
    // Only the hash is kept: the secret appears nowhere in what is stored.
    assert_eq!(rec.hash, sha256(secret.as_bytes()));
    assert!(!format!("{write:?}").contains(secret));
    let ok = t.redeem(2000, ip(), &token, "pi-1").unwrap();
    assert_eq!(ok.name, "pi-1");
    assert!(!ok.named_by_token);
    assert!(matches!(ok.write, TrustWrite::Token(ref r) if r.uses == 1));
    assert_eq!(
        t.redeem(3000, ip(), &token, "pi-2"),
        Err(EnrollRefusal::UsedUp)
    );
    assert!(t.tokens(3000).is_empty(), "a used-up token is not listed");
}

#[test]
fn multi_use_token_and_token_name_wins() {
    let mut t = trust();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (token, _, _) = t.create_token(0, 60_000, 2, None, Some("edge-7".into()), &mut rng);
    let a = t.redeem(1, ip(), &token, "whatever").unwrap();
    assert_eq!(a.name, "edge-7");
    assert!(a.named_by_token);
    assert!(t.redeem(2, ip(), &token, "x").is_ok());
    assert_eq!(t.redeem(3, ip(), &token, "x"), Err(EnrollRefusal::UsedUp));
}

#[test]
fn expired_wrong_and_revoked_tokens_are_refused() {
    let mut t = trust();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (token, rec, _) = t.create_token(0, 1000, 5, None, None, &mut rng);
    assert_eq!(
        t.redeem(1000, ip(), &token, "w"),
        Err(EnrollRefusal::Expired)
    );
    let (token2, rec2, _) = t.create_token(0, 100_000, 5, None, None, &mut rng);
    let wrong = format!("{}.{}", rec2.id, "0".repeat(64));
    assert_eq!(
        t.redeem(1, ip(), &wrong, "w"),
        Err(EnrollRefusal::NotAccepted)
    );
    assert_eq!(
        t.redeem(1, ip(), "garbage", "w"),
        Err(EnrollRefusal::NotAccepted)
    );
    assert!(matches!(t.revoke_token(&rec2.id), Some(Some(_))));
    assert_eq!(t.redeem(2, ip(), &token2, "w"), Err(EnrollRefusal::Revoked));
    assert!(t.revoke_token("nope").is_none());
    let _ = rec;
}

#[test]
fn failures_are_rate_limited_per_source() {
    let mut t = trust();
    t.set_limits(
        limiter::Rate {
            burst: 2,
            refill_ms: 10_000,
        },
        limiter::GLOBAL,
        0,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (token, _, _) = t.create_token(0, 1_000_000, 1, None, None, &mut rng);
    for _ in 0..2 {
        assert_eq!(
            t.redeem(0, ip(), "a.b", "w"),
            Err(EnrollRefusal::NotAccepted)
        );
    }
    // Even the right token is not looked at while the address is limited.
    assert!(matches!(
        t.redeem(0, ip(), &token, "w"),
        Err(EnrollRefusal::RateLimited { .. })
    ));
    // Another address is not limited.
    assert!(t
        .redeem(0, IpAddr::from([192, 0, 2, 2]), &token, "w")
        .is_ok());
}

#[test]
fn revoked_name_is_refused_until_reinstated_and_its_certs_forever() {
    let mut t = trust();
    t.record_issued(IssuedRecord {
        fingerprint: "aa".into(),
        name: "w1".into(),
        serial: "01".into(),
        not_after_ms: 10,
        issued_ms: 0,
        revoked_ms: None,
    });
    assert_eq!(t.refusal("w1", "aa"), None);
    let (changed, certs, write) = t.revoke_name(5, "w1");
    assert!(changed && certs == 1 && write.is_some());
    assert!(t.refusal("w1", "aa").is_some());
    assert!(
        t.refusal("w1", "bb").is_some(),
        "any certificate of the name"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (token, _, _) = t.create_token(0, 1000, 1, None, Some("w1".into()), &mut rng);
    assert!(matches!(
        t.redeem(6, ip(), &token, "w1"),
        Err(EnrollRefusal::NameRevoked { .. })
    ));
    assert!(!t.revoke_name(7, "w1").0, "second revoke changes nothing");
    assert!(t.reinstate("w1").is_some());
    assert_eq!(t.refusal("w1", "bb"), None);
    assert!(
        t.refusal("w1", "aa").is_some(),
        "old certificates stay refused"
    );
    assert!(t.redeem(8, ip(), &token, "w1").is_ok());
}

#[test]
fn constant_time_eq_basics() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
}
