//! Accounts (users, API keys) and the read-model queries over projected orders and trades.

use store::{ApiKeyRow, OrderRow, ProjectionBatch, StoreError, TradeRow, UserRow};

use crate::targets;

#[tokio::test]
async fn users_are_created_found_paged_and_given_roles() {
    for target in targets("users") {
        let store = target.open().await;
        let backend = store.backend_name();
        assert_eq!(store.user_count().await.unwrap(), 0);
        let alice = store
            .create_user("alice", "h-a", "admin", 10)
            .await
            .unwrap();
        let bob = store.create_user("bob", "h-b", "user", 20).await.unwrap();
        let carol = store.create_user("carol", "h-c", "user", 30).await.unwrap();
        assert_eq!(
            alice,
            UserRow {
                id: alice.id,
                username: "alice".into(),
                password_hash: "h-a".into(),
                role: "admin".into(),
                created_ms: 10,
            }
        );
        assert!(0 < alice.id && alice.id < bob.id && bob.id < carol.id);

        // Names are unique and compared case-sensitively.
        match store.create_user("alice", "h-x", "user", 40).await {
            Err(StoreError::Duplicate { what: "username" }) => {}
            other => panic!("{backend}: expected a duplicate username, got {other:?}"),
        }
        let upper = store.create_user("Alice", "h-u", "user", 50).await.unwrap();
        assert!(upper.id > carol.id);
        assert_eq!(store.user_count().await.unwrap(), 4);

        for (name, expected) in [
            ("alice", Some(&alice)),
            ("Alice", Some(&upper)),
            ("bob", Some(&bob)),
            ("ALICE", None),
            ("", None),
        ] {
            let found = store.user_by_name(name).await.unwrap();
            assert_eq!(
                found.as_ref(),
                expected,
                "{backend}: user_by_name({name:?})"
            );
        }
        for (id, expected) in [
            (carol.id, Some(&carol)),
            (0, None),
            (upper.id + 1, None),
            (u64::MAX, None),
        ] {
            let found = store.user_by_id(id).await.unwrap();
            assert_eq!(found.as_ref(), expected, "{backend}: user_by_id({id})");
        }

        // Pages follow the last id of the previous page.
        let names = |users: Vec<UserRow>| users.into_iter().map(|u| u.username).collect::<Vec<_>>();
        for (after_id, limit, expected) in [
            (0, 2, &["alice", "bob"][..]),
            (bob.id, 2, &["carol", "Alice"]),
            (upper.id, 2, &[]),
            (0, 0, &[]),
            (0, usize::MAX, &["alice", "bob", "carol", "Alice"]),
            (u64::MAX, 10, &[]),
        ] {
            let page = store.users(after_id, limit).await.unwrap();
            assert_eq!(
                names(page),
                expected,
                "{backend}: users({after_id}, {limit})"
            );
        }

        assert!(store.set_user_role(bob.id, "admin").await.unwrap());
        assert_eq!(
            store.user_by_id(bob.id).await.unwrap().unwrap().role,
            "admin"
        );
        assert!(!store.set_user_role(upper.id + 1, "admin").await.unwrap());
        assert!(!store.set_user_role(u64::MAX, "admin").await.unwrap());
        store.close().await;

        // Accounts are durable, and a page holds at most PAGE_ROWS_MAX users.
        target
            .tamper(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1001) \
                 INSERT INTO users (username, password_hash, role, created_ms) SELECT 'bulk' || i, 'h', 'user', 0 FROM n",
            )
            .await;
        let store = target.open().await;
        assert_eq!(
            store.user_by_name("bob").await.unwrap().unwrap().role,
            "admin"
        );
        assert_eq!(store.user_count().await.unwrap(), 1005);
        let max = store::limits::PAGE_ROWS_MAX;
        let first = store.users(0, usize::MAX).await.unwrap();
        assert_eq!(first.len(), max, "{backend}");
        let rest = store.users(first[max - 1].id, usize::MAX).await.unwrap();
        assert_eq!(rest.len(), 1005 - max, "{backend}");
        assert_eq!(rest.last().unwrap().username, "bulk1001");
    }
}

#[tokio::test]
async fn api_keys_are_created_looked_up_and_revoked_only_by_their_owner() {
    for target in targets("api_keys") {
        let store = target.open().await;
        let backend = store.backend_name();
        let alice = store.create_user("alice", "h", "user", 1).await.unwrap().id;
        let bob = store.create_user("bob", "h", "user", 2).await.unwrap().id;
        let laptop = store
            .create_api_key("ak1", alice, "s1", "laptop", 10)
            .await
            .unwrap();
        let bot = store
            .create_api_key("ak2", alice, "s2", "bot", 20)
            .await
            .unwrap();
        let bobs = store
            .create_api_key("bk1", bob, "s3", "", 30)
            .await
            .unwrap();
        assert_eq!(
            laptop,
            ApiKeyRow {
                key_id: "ak1".into(),
                user_id: alice,
                secret: "s1".into(),
                label: "laptop".into(),
                created_ms: 10,
                revoked: false,
            }
        );

        match store.create_api_key("ak1", bob, "s4", "", 40).await {
            Err(StoreError::Duplicate { what: "api key" }) => {}
            other => panic!("{backend}: expected a duplicate api key, got {other:?}"),
        }
        for user in [bob + 100, u64::MAX] {
            match store.create_api_key("ck1", user, "s5", "", 50).await {
                Err(StoreError::UnknownUser(id)) => assert_eq!(id, user),
                other => panic!("{backend}: expected an unknown user, got {other:?}"),
            }
        }

        assert_eq!(store.api_key("ak2").await.unwrap().as_ref(), Some(&bot));
        assert_eq!(store.api_key("AK2").await.unwrap(), None);
        assert_eq!(
            store.api_keys_of(alice).await.unwrap(),
            [laptop.clone(), bot.clone()]
        );
        assert_eq!(store.api_keys_of(bob).await.unwrap(), [bobs]);
        assert!(store.api_keys_of(bob + 100).await.unwrap().is_empty());

        // (key, as whom, revoked?, whether each key is revoked afterwards: ak1, ak2, bk1)
        for (key_id, user, expected, after) in [
            ("bk1", Some(alice), false, [false, false, false]),
            ("ak1", Some(bob), false, [false, false, false]),
            ("ak1", Some(alice), true, [true, false, false]),
            ("ak1", Some(alice), true, [true, false, false]),
            ("nope", Some(alice), false, [true, false, false]),
            ("ak2", Some(u64::MAX), false, [true, false, false]),
            ("bk1", None, true, [true, false, true]),
            ("nope", None, false, [true, false, true]),
        ] {
            let revoked = store.revoke_api_key(key_id, user).await.unwrap();
            assert_eq!(revoked, expected, "{backend}: revoke {key_id} as {user:?}");
            let mut now = [false; 3];
            for (slot, key) in ["ak1", "ak2", "bk1"].iter().enumerate() {
                now[slot] = store.api_key(key).await.unwrap().unwrap().revoked;
            }
            assert_eq!(now, after, "{backend}: after revoking {key_id} as {user:?}");
        }

        // Live keys come first, so that a full page leaves out revoked ones.
        let keys = store.api_keys_of(alice).await.unwrap();
        let order: Vec<(&str, bool)> = keys
            .iter()
            .map(|k| (k.key_id.as_str(), k.revoked))
            .collect();
        assert_eq!(order, [("ak2", false), ("ak1", true)], "{backend}");

        // A revoked key keeps its id.
        assert!(matches!(
            store.create_api_key("ak1", alice, "s6", "", 60).await,
            Err(StoreError::Duplicate { what: "api key" })
        ));
    }
}

fn order(
    (market, order_id, accepted_seq, user): (u32, u64, u64, u64),
    (side, order_type, qty, filled): (&'static str, &'static str, u64, u64),
    (status, updated_seq): (&'static str, u64),
) -> OrderRow {
    let open_qty = if status == "open" { qty - filled } else { 0 };
    OrderRow {
        market,
        order_id,
        accepted_seq,
        user,
        side,
        order_type,
        // A price that round-trips through the column, different per order.
        price: (order_type == "limit").then_some(1_000 + order_id as i64),
        qty,
        filled,
        open_qty,
        status,
        updated_seq,
    }
}

fn trade(
    (seq, n, market): (u64, u32, u32),
    (maker, maker_user, taker, taker_user): (u64, u64, u64, u64),
    taker_side: &'static str,
) -> TradeRow {
    TradeRow {
        seq,
        n,
        market,
        maker,
        taker,
        maker_user,
        taker_user,
        taker_side,
        price: 100 + seq as i64,
        qty: 1,
    }
}

/// Projects two runs of commands: user 7 places five orders over two markets, trades as
/// maker, as taker and with itself, and an order id is used again (by user 9).
async fn project_orders_and_trades(store: &store::Store) {
    let first = ProjectionBatch {
        first_seq: 1,
        last_seq: 4,
        orders: vec![
            order((1, 1, 1, 7), ("buy", "limit", 10, 0), ("open", 1)),
            order((1, 2, 2, 8), ("sell", "limit", 5, 0), ("open", 2)),
            order((2, 3, 3, 7), ("sell", "market", 3, 3), ("filled", 3)),
            order((1, 4, 4, 7), ("buy", "stop_limit", 4, 0), ("cancelled", 4)),
        ],
        trades: vec![
            trade((3, 0, 2), (10, 8, 3, 7), "sell"),
            trade((3, 1, 2), (11, 9, 3, 7), "sell"),
        ],
        ..ProjectionBatch::default()
    };
    store.write_projection("read-models", &first).await.unwrap();
    let second = ProjectionBatch {
        first_seq: 5,
        last_seq: 7,
        orders: vec![
            // The first order fills, and its id is used again.
            order((1, 1, 1, 7), ("buy", "limit", 10, 10), ("filled", 5)),
            order(
                (1, 1, 6, 9),
                ("sell", "take_profit_limit", 2, 0),
                ("open", 6),
            ),
            order((1, 5, 7, 7), ("buy", "limit", 1, 0), ("expired", 7)),
        ],
        trades: vec![
            trade((5, 0, 1), (1, 7, 12, 8), "sell"),
            trade((6, 0, 1), (13, 7, 14, 7), "buy"),
        ],
        ..ProjectionBatch::default()
    };
    store
        .write_projection("read-models", &second)
        .await
        .unwrap();
}

#[tokio::test]
async fn orders_of_a_user_are_newest_first_and_filtered() {
    for target in targets("orders") {
        let store = target.open().await;
        let backend = store.backend_name();
        assert_eq!(store.max_order_id().await.unwrap(), 0);
        assert_eq!(store.order_row(1, 1).await.unwrap(), None);
        project_orders_and_trades(&store).await;
        assert_eq!(store.max_order_id().await.unwrap(), 5);

        for ((market, order_id), expected) in [
            (
                (1, 1),
                Some(order(
                    (1, 1, 6, 9),
                    ("sell", "take_profit_limit", 2, 0),
                    ("open", 6),
                )),
            ),
            (
                (2, 3),
                Some(order((2, 3, 3, 7), ("sell", "market", 3, 3), ("filled", 3))),
            ),
            ((2, 1), None),
            ((1, 99), None),
            ((1, u64::MAX), None),
        ] {
            let found = store.order_row(market, order_id).await.unwrap();
            assert_eq!(
                found, expected,
                "{backend}: order_row({market}, {order_id})"
            );
        }

        // (user, market, status, before_seq, limit) and the accepted_seq of each row found.
        for ((user, market, status, before_seq, limit), expected) in [
            ((7, None, None, None, 10), &[7, 4, 3, 1][..]),
            ((7, Some(1), None, None, 10), &[7, 4, 1]),
            ((7, Some(2), None, None, 10), &[3]),
            ((7, None, Some("filled"), None, 10), &[3, 1]),
            ((7, Some(1), Some("filled"), None, 10), &[1]),
            ((7, None, Some("open"), None, 10), &[]),
            ((7, None, Some("bogus"), None, 10), &[]),
            ((7, None, None, Some(4), 10), &[3, 1]),
            ((7, None, None, Some(1), 10), &[]),
            ((7, None, None, Some(u64::MAX), 10), &[7, 4, 3, 1]),
            ((7, None, None, None, 2), &[7, 4]),
            ((7, None, None, None, 0), &[]),
            ((7, Some(1), Some("cancelled"), Some(5), usize::MAX), &[4]),
            ((9, None, None, None, 10), &[6]),
            ((8, None, Some("open"), None, 10), &[2]),
            ((1, None, None, None, 10), &[]),
        ] {
            let rows = store
                .orders_of_user(user, market, status, before_seq, limit)
                .await
                .unwrap();
            assert!(rows.iter().all(|row| row.user == user));
            let seqs: Vec<u64> = rows.iter().map(|row| row.accepted_seq).collect();
            assert_eq!(
                seqs, expected,
                "{backend}: orders_of_user({user}, {market:?}, {status:?}, {before_seq:?}, {limit})"
            );
        }
        // The rows are the projected rows as last written.
        let filled = store
            .orders_of_user(7, Some(1), Some("filled"), None, 10)
            .await
            .unwrap();
        assert_eq!(
            filled,
            [order((1, 1, 1, 7), ("buy", "limit", 10, 10), ("filled", 5))]
        );
    }
}

#[tokio::test]
async fn trades_of_a_user_and_of_a_market_are_newest_first() {
    for target in targets("trades") {
        let store = target.open().await;
        let backend = store.backend_name();
        project_orders_and_trades(&store).await;

        // (user, market, limit) and the (seq, n) of each trade found; a trade with oneself
        // is listed once.
        for ((user, market, limit), expected) in [
            ((7, None, 10), &[(6, 0), (5, 0), (3, 1), (3, 0)][..]),
            ((7, None, 2), &[(6, 0), (5, 0)]),
            ((7, Some(2), 10), &[(3, 1), (3, 0)]),
            ((7, Some(1), 1), &[(6, 0)]),
            ((7, Some(3), 10), &[]),
            ((8, None, 10), &[(5, 0), (3, 0)]),
            ((9, None, 10), &[(3, 1)]),
            ((7, None, 0), &[]),
            ((1, None, 10), &[]),
        ] {
            let rows = store.trades_of_user(user, market, limit).await.unwrap();
            assert!(
                rows.iter()
                    .all(|t| t.maker_user == user || t.taker_user == user)
            );
            let keys: Vec<(u64, u32)> = rows.iter().map(|t| (t.seq, t.n)).collect();
            assert_eq!(
                keys, expected,
                "{backend}: trades_of_user({user}, {market:?}, {limit})"
            );
        }
        for ((market, limit), expected) in [
            ((1, 10), &[(6, 0), (5, 0)][..]),
            ((2, 10), &[(3, 1), (3, 0)]),
            ((2, 1), &[(3, 1)]),
            ((3, 10), &[]),
        ] {
            let rows = store.recent_trades(market, limit).await.unwrap();
            let keys: Vec<(u64, u32)> = rows.iter().map(|t| (t.seq, t.n)).collect();
            assert_eq!(
                keys, expected,
                "{backend}: recent_trades({market}, {limit})"
            );
        }
        assert_eq!(
            store.recent_trades(1, 1).await.unwrap(),
            [trade((6, 0, 1), (13, 7, 14, 7), "buy")]
        );

        // A page holds at most PAGE_ROWS_MAX trades.
        let max = store::limits::PAGE_ROWS_MAX;
        let many = ProjectionBatch {
            first_seq: 8,
            last_seq: 8,
            trades: (0..=max as u32)
                .map(|n| trade((8, n, 3), (20, 7, 21, 8), "buy"))
                .collect(),
            ..ProjectionBatch::default()
        };
        store.write_projection("read-models", &many).await.unwrap();
        let newest = store.recent_trades(3, usize::MAX).await.unwrap();
        assert_eq!(newest.len(), max, "{backend}");
        assert_eq!((newest[0].n, newest[max - 1].n), (max as u32, 1));
        for user in [7, 8] {
            let rows = store.trades_of_user(user, None, usize::MAX).await.unwrap();
            assert_eq!(rows.len(), max, "{backend}: user {user}");
            assert_eq!(rows[0].n, max as u32);
        }
    }
}

#[tokio::test]
async fn unknown_names_in_the_read_models_are_reported_as_corruption() {
    for target in targets("read_corrupt") {
        let store = target.open().await;
        let backend = store.backend_name();
        project_orders_and_trades(&store).await;
        target
            .tamper_read_models("UPDATE orders SET side = 'up' WHERE order_id = 2")
            .await;
        target
            .tamper_read_models("UPDATE orders SET status = 'gone' WHERE order_id = 3")
            .await;
        target
            .tamper_read_models("UPDATE orders SET order_type = 'iceberg' WHERE order_id = 4")
            .await;
        target
            .tamper_read_models("UPDATE trades SET taker_side = 'BUY' WHERE seq = 6")
            .await;
        let corrupt = |result: Result<_, StoreError>| match result {
            Err(StoreError::Corrupt {
                what,
                position,
                problem,
            }) => (what, position, problem),
            other => panic!("{backend}: expected corruption, got {other:?}"),
        };
        assert_eq!(
            corrupt(store.order_row(1, 2).await.map(|_| ())),
            ("order", 2, "unknown side \"up\"".to_string())
        );
        assert_eq!(
            corrupt(
                store
                    .orders_of_user(7, Some(2), None, None, 10)
                    .await
                    .map(|_| ())
            ),
            ("order", 3, "unknown status \"gone\"".to_string())
        );
        assert_eq!(
            corrupt(store.order_row(1, 4).await.map(|_| ())),
            ("order", 4, "unknown order_type \"iceberg\"".to_string())
        );
        assert_eq!(
            corrupt(store.recent_trades(1, 10).await.map(|_| ())),
            ("trade", 6, "unknown taker_side \"BUY\"".to_string())
        );
        // Rows around them still read.
        assert_eq!(store.recent_trades(2, 10).await.unwrap().len(), 2);
        assert!(store.order_row(1, 1).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn a_projection_batch_may_change_one_order_several_times() {
    for target in targets("order_twice") {
        let store = target.open().await;
        let backend = store.backend_name();
        // Placed, partly filled, then cancelled within one batch (several journal batches
        // projected in one transaction, or a maker and its taker in one batch): the last row
        // of each order is the one kept.
        let batch = ProjectionBatch {
            first_seq: 1,
            last_seq: 3,
            orders: vec![
                order((1, 1, 1, 7), ("buy", "limit", 10, 0), ("open", 1)),
                order((1, 1, 1, 7), ("buy", "limit", 10, 4), ("open", 2)),
                order((1, 2, 2, 8), ("sell", "limit", 4, 4), ("filled", 2)),
                order((1, 1, 1, 7), ("buy", "limit", 10, 4), ("cancelled", 3)),
            ],
            ..ProjectionBatch::default()
        };
        store
            .write_projection("read-models", &batch)
            .await
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(
            store.order_row(1, 1).await.unwrap(),
            Some(order(
                (1, 1, 1, 7),
                ("buy", "limit", 10, 4),
                ("cancelled", 3)
            )),
            "{backend}"
        );
        assert_eq!(
            store.order_row(1, 2).await.unwrap(),
            Some(order((1, 2, 2, 8), ("sell", "limit", 4, 4), ("filled", 2))),
            "{backend}"
        );
    }
}
