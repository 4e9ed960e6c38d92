//! The checkout: an orchestrated saga ([`consumer_kit::saga`]) across three
//! services, each a consumer with its own schema.
//!
//! ```text
//!  checkout.started ─► Reserving ── stock.reserve ──────────► inventory
//!     stock.reserved ─► Charging ── payment.charge ─────────► payment
//!        payment.charged ─► Ordering ── order.create ───────► ordering
//!           order.created ─► Completed: stock.confirm, cart cleared
//!     stock.unavailable ─► Failed (nothing to undo)
//!     payment.declined  ─► Failed: stock.release
//!     no answer within step_timeout ─► Failed: stock.release, and
//!        payment.refund / order.cancel for the steps that may have happened
//!  a late answer after Failed ─► undone: stock.release, payment.refund,
//!     order.cancel
//! ```
//!
//! The saga runs in the `checkout` schema (its instances, its carts). The
//! services answer on the checkout topic, keyed by checkout id, so an
//! instance's answers and its timeouts arrive in order on one partition.
//! Every service writes its answer to the outbox in the transaction that
//! applies the command. Here the services share one database (each in its
//! own schema) and one outbox and relay; in production each would have its
//! own database, outbox and relay, and nothing below would change.
//!
//! The payment service declines [`Faults::decline_every`]-th charge and
//! stays silent on [`Faults::silence_every`]-th one (it charges, and the
//! answer is lost), so that every path shows. Every handler logs its effect
//! in its schema's `effects` table, which has no unique constraint: an
//! event applied twice would show there.
//!
//! One file because it is one workflow: the saga and the three services it
//! talks to read best side by side.

use std::time::Duration;

use consumer_kit::{
    saga::{payload_as, Instance},
    Consumer, Envelope, Handler, HandlerError, Saga, SagaEvent, Transition,
};
use outbox_core::{append, NewEvent};
use serde::{Deserialize, Serialize};
use sqlx::{postgres::PgConnectOptions, PgPool, PgTransaction};

use crate::consumers::Broker;

/// The services' schemas (and consumer groups), the saga's first.
pub const SERVICES: [&str; 4] = ["checkout", "stock", "payment", "ordering"];

const SCHEMAS: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS carts (checkout_id text PRIMARY KEY, sku text NOT NULL, quantity integer NOT NULL,
         amount_cents bigint NOT NULL, cleared boolean NOT NULL DEFAULT false);
     CREATE TABLE IF NOT EXISTS effects (checkout_id text NOT NULL, event_id uuid NOT NULL, what text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, initial bigint NOT NULL, available bigint NOT NULL,
         reserved bigint NOT NULL DEFAULT 0, confirmed bigint NOT NULL DEFAULT 0);
     CREATE TABLE IF NOT EXISTS reservations (checkout_id text NOT NULL, sku text NOT NULL, quantity integer NOT NULL,
         status text NOT NULL);
     CREATE TABLE IF NOT EXISTS effects (checkout_id text NOT NULL, event_id uuid NOT NULL, what text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS payments (checkout_id text NOT NULL, amount_cents bigint NOT NULL, status text NOT NULL);
     CREATE TABLE IF NOT EXISTS effects (checkout_id text NOT NULL, event_id uuid NOT NULL, what text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (checkout_id text NOT NULL, amount_cents bigint NOT NULL, status text NOT NULL);
     CREATE TABLE IF NOT EXISTS effects (checkout_id text NOT NULL, event_id uuid NOT NULL, what text NOT NULL)",
];

/// The injected faults of the payment service.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Every n-th charge (by checkout number) is declined; 0: none.
    pub decline_every: u64,
    /// Every n-th charge is made but never answered; 0: none.
    pub silence_every: u64,
}

/// The saga's topics and timing.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Checkout starts, the services' answers and the saga's timeouts,
    /// keyed by checkout id.
    pub checkout: String,
    /// The saga's commands, keyed by checkout id, read by the three
    /// services (each skips the others' commands).
    pub commands: String,
}

/// A checkout as the cart service starts it (`checkout.started`), what
/// every command and answer carries, and the saga's data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// The checkout.
    pub checkout_id: String,
    /// Its number.
    #[serde(default)]
    pub number: u64,
    /// The product.
    #[serde(default)]
    pub sku: String,
    /// How many.
    #[serde(default)]
    pub quantity: i32,
    /// The price.
    #[serde(default)]
    pub amount_cents: i64,
}

/// The checkout's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Waiting for the inventory.
    Reserving,
    /// Waiting for the payment.
    Charging,
    /// Waiting for the order service.
    Ordering,
    /// Done: ordered, stock confirmed, cart cleared.
    Completed,
    /// Out of stock, declined, or a step did not answer; undone.
    Failed,
}

/// The checkout saga.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// Where its commands go, and its timeouts.
    pub topics: Topics,
    /// How long each step may take to answer. Default
    /// [`Checkout::DEFAULT_STEP_TIMEOUT`]; seconds in the demo.
    pub step_timeout: Duration,
}

impl Checkout {
    /// A step's default timeout.
    pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

    /// The saga on `topics`, with the default step timeout.
    pub fn new(topics: Topics) -> Self {
        Self {
            topics,
            step_timeout: Self::DEFAULT_STEP_TIMEOUT,
        }
    }

    fn command(&self, data: &Step, kind: &str) -> NewEvent {
        NewEvent::new("checkout", data.checkout_id.clone(), kind)
            .topic(&self.topics.commands)
            .json_payload(data)
            .expect("a Step serializes")
    }

    /// Everything to undo when a checkout fails in `state`: the steps that
    /// were asked for may have happened, even without an answer.
    fn undo(&self, data: &Step, state: State) -> Vec<NewEvent> {
        let mut out = Vec::new();
        if matches!(state, State::Reserving | State::Charging | State::Ordering) {
            out.push(self.command(data, "stock.release"));
        }
        if matches!(state, State::Charging | State::Ordering) {
            out.push(self.command(data, "payment.refund"));
        }
        if state == State::Ordering {
            out.push(self.command(data, "order.cancel"));
        }
        out
    }
}

async fn effect(
    tx: &mut PgTransaction<'static>,
    checkout: &str,
    event_id: uuid::Uuid,
    what: &str,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO effects (checkout_id, event_id, what) VALUES ($1, $2, $3)")
        .bind(checkout)
        .bind(event_id)
        .bind(what)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[consumer_kit::async_trait]
impl Saga for Checkout {
    const NAME: &'static str = "checkout";
    type State = State;
    type Data = Step;

    fn events(&self) -> Vec<String> {
        [
            "checkout.started",
            "stock.reserved",
            "stock.unavailable",
            "payment.charged",
            "payment.declined",
            "order.created",
        ]
        .map(String::from)
        .to_vec()
    }

    fn correlate(&self, event: &SagaEvent) -> Option<String> {
        event.payload["checkout_id"].as_str().map(String::from)
    }

    fn start(&self, event: &SagaEvent) -> Option<(State, Step)> {
        if event.event_type != "checkout.started" {
            return None;
        }
        Some((State::Reserving, payload_as(event).ok()?))
    }

    async fn on_event(
        &self,
        event: &SagaEvent,
        me: &mut Instance<Self>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Transition<State>, HandlerError> {
        let d = me.data.clone();
        let step = self.step_timeout;
        let t = match (event.event_type.as_str(), me.state) {
            ("checkout.started", State::Reserving) if me.version == 0 => Transition::stay()
                .send(self.command(&d, "stock.reserve"))
                .schedule("step", step),
            ("stock.reserved", State::Reserving) => Transition::to(State::Charging)
                .send(self.command(&d, "payment.charge"))
                .schedule("step", step),
            ("stock.unavailable", State::Reserving) => {
                Transition::to(State::Failed).fail("out of stock")
            }
            ("payment.charged", State::Charging) => Transition::to(State::Ordering)
                .send(self.command(&d, "order.create"))
                .schedule("step", step),
            ("payment.declined", State::Charging) => Transition::to(State::Failed)
                .send(self.command(&d, "stock.release"))
                .fail("payment declined"),
            ("order.created", State::Ordering) => {
                sqlx::query("UPDATE carts SET cleared = true WHERE checkout_id = $1")
                    .bind(&me.id)
                    .execute(&mut **tx)
                    .await?;
                Transition::to(State::Completed)
                    .send(self.command(&d, "stock.confirm"))
                    .complete()
            }
            // A late answer to a failed checkout: undo what it reports.
            ("stock.reserved", State::Failed) => {
                Transition::stay().send(self.command(&d, "stock.release"))
            }
            ("payment.charged", State::Failed) => {
                Transition::stay().send(self.command(&d, "payment.refund"))
            }
            ("order.created", State::Failed) => {
                Transition::stay().send(self.command(&d, "order.cancel"))
            }
            // Nothing to undo for a refusal after the fact.
            ("stock.unavailable" | "payment.declined", State::Failed) => Transition::stay(),
            (other, state) => {
                return Ok(Transition::unexpected(format!("{other} in {state:?}")));
            }
        };
        effect(tx, &me.id, event.event_id, &event.event_type).await?;
        Ok(t)
    }

    async fn on_timeout(
        &self,
        name: &str,
        me: &mut Instance<Self>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Transition<State>, HandlerError> {
        let state = me.state;
        if name != "step" || !matches!(state, State::Reserving | State::Charging | State::Ordering)
        {
            return Ok(Transition::unexpected(format!(
                "timeout {name} in {state:?}"
            )));
        }
        effect(tx, &me.id, uuid::Uuid::now_v7(), "timeout").await?;
        let mut t = Transition::to(State::Failed).fail(format!("no answer while {state:?}"));
        for e in self.undo(&me.data, state) {
            t = t.send(e);
        }
        Ok(t)
    }

    fn timeout_topic(&self) -> Option<String> {
        Some(self.topics.checkout.clone())
    }
}

/// An answer to the saga, on the checkout topic.
fn answer(topics: &Topics, d: &Step, kind: &str) -> Result<NewEvent, HandlerError> {
    NewEvent::new("checkout", d.checkout_id.clone(), kind)
        .topic(&topics.checkout)
        .json_payload(d)
        .map_err(HandlerError::permanent)
}

async fn send(tx: &mut PgTransaction<'static>, e: NewEvent) -> Result<(), HandlerError> {
    append(&mut **tx, &e)
        .await
        .map_err(HandlerError::permanent)
        .map(|_| ())
}

/// The inventory: reserves, confirms and releases stock.
#[derive(Debug, Clone)]
struct Inventory(Topics);

#[consumer_kit::async_trait]
impl Handler for Inventory {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        event: &Envelope<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let d: Step = payload_as(event)?;
        let id = &d.checkout_id;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM reservations WHERE checkout_id = $1")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        let what = match (event.event_type.as_str(), status.as_deref()) {
            ("stock.reserve", None) => {
                let took = sqlx::query(
                    "UPDATE stock SET available = available - $2, reserved = reserved + $2 \
                     WHERE sku = $1 AND available >= $2",
                )
                .bind(&d.sku)
                .bind(i64::from(d.quantity))
                .execute(&mut **tx)
                .await?
                .rows_affected()
                    == 1;
                let (status, reply) = if took {
                    ("reserved", "stock.reserved")
                } else {
                    ("refused", "stock.unavailable")
                };
                sqlx::query("INSERT INTO reservations (checkout_id, sku, quantity, status) VALUES ($1, $2, $3, $4)")
                    .bind(id).bind(&d.sku).bind(d.quantity).bind(status)
                    .execute(&mut **tx).await?;
                send(tx, answer(&self.0, &d, reply)?).await?;
                status
            }
            ("stock.confirm", Some("reserved")) => {
                move_stock(
                    tx,
                    &d,
                    "reserved = reserved - $2, confirmed = confirmed + $2",
                )
                .await?;
                set_status(tx, id, "confirmed").await?;
                "confirmed"
            }
            ("stock.release", Some("reserved")) => {
                move_stock(
                    tx,
                    &d,
                    "reserved = reserved - $2, available = available + $2",
                )
                .await?;
                set_status(tx, id, "released").await?;
                "released"
            }
            // A release of nothing reserved (refused, released already):
            // nothing to do, but it is applied once all the same.
            (_, _) => "nothing",
        };
        effect(
            tx,
            id,
            event.event_id,
            &format!("{} {what}", event.event_type),
        )
        .await
    }
}

async fn move_stock(
    tx: &mut PgTransaction<'static>,
    d: &Step,
    set: &str,
) -> Result<(), HandlerError> {
    sqlx::query(&format!("UPDATE stock SET {set} WHERE sku = $1"))
        .bind(&d.sku)
        .bind(i64::from(d.quantity))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn set_status(
    tx: &mut PgTransaction<'static>,
    checkout: &str,
    status: &str,
) -> Result<(), HandlerError> {
    sqlx::query("UPDATE reservations SET status = $2 WHERE checkout_id = $1")
        .bind(checkout)
        .bind(status)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The payment service, with its injected faults.
#[derive(Debug, Clone)]
struct Payment(Topics, Faults);

#[consumer_kit::async_trait]
impl Handler for Payment {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        event: &Envelope<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let d: Step = payload_as(event)?;
        let id = &d.checkout_id;
        let every = |n: u64| n > 0 && d.number % n == n - 1;
        let what = match event.event_type.as_str() {
            "payment.charge" if every(self.1.decline_every) => {
                sqlx::query("INSERT INTO payments (checkout_id, amount_cents, status) VALUES ($1, $2, 'declined')")
                    .bind(id).bind(d.amount_cents).execute(&mut **tx).await?;
                send(tx, answer(&self.0, &d, "payment.declined")?).await?;
                "declined"
            }
            "payment.charge" => {
                sqlx::query("INSERT INTO payments (checkout_id, amount_cents, status) VALUES ($1, $2, 'charged')")
                    .bind(id).bind(d.amount_cents).execute(&mut **tx).await?;
                if every(self.1.silence_every) {
                    "charged, answer lost"
                } else {
                    send(tx, answer(&self.0, &d, "payment.charged")?).await?;
                    "charged"
                }
            }
            _ => {
                // payment.refund
                let n = sqlx::query(
                    "UPDATE payments SET status = 'refunded' WHERE checkout_id = $1 AND status = 'charged'",
                )
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if n > 0 {
                    "refunded"
                } else {
                    "nothing to refund"
                }
            }
        };
        effect(
            tx,
            id,
            event.event_id,
            &format!("{} {what}", event.event_type),
        )
        .await
    }
}

/// The order service: creates and cancels orders.
#[derive(Debug, Clone)]
struct Ordering(Topics);

#[consumer_kit::async_trait]
impl Handler for Ordering {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        event: &Envelope<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let d: Step = payload_as(event)?;
        let id = &d.checkout_id;
        let what = if event.event_type == "order.create" {
            sqlx::query(
                "INSERT INTO orders (checkout_id, amount_cents, status) VALUES ($1, $2, 'created')",
            )
            .bind(id)
            .bind(d.amount_cents)
            .execute(&mut **tx)
            .await?;
            send(tx, answer(&self.0, &d, "order.created")?).await?;
            "created"
        } else {
            sqlx::query("UPDATE orders SET status = 'cancelled' WHERE checkout_id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            "cancelled"
        };
        effect(
            tx,
            id,
            event.event_id,
            &format!("{} {what}", event.event_type),
        )
        .await
    }
}

/// The products and how many checkouts each can serve: the last one runs
/// out, so that some checkouts fail for want of stock.
const PRODUCTS: [(&str, f64); 4] = [
    ("book", 1.0),
    ("lamp", 1.0),
    ("mug", 1.0),
    ("rare-print", 0.5),
];

/// Stocks the inventory (its pool, from [`prepare`]) for `checkouts`
/// checkouts: enough of every product but the scarce one.
pub async fn stock_up(inventory: &PgPool, checkouts: usize) -> anyhow::Result<()> {
    for (sku, share) in PRODUCTS {
        // Each checkout takes 1 or 2 (1.5 on average) of one product.
        let stock = (checkouts as f64 / PRODUCTS.len() as f64 * 1.5 * share).round() as i64;
        sqlx::query("INSERT INTO stock (sku, initial, available) VALUES ($1, $2, $2)")
            .bind(sku)
            .bind(stock)
            .execute(inventory)
            .await?;
    }
    Ok(())
}

/// Starts checkout `number` as a cart service would: its cart and a
/// `checkout.started` event in one transaction, through the checkout
/// service's pool (from [`prepare`]).
pub async fn start(checkout: &PgPool, topics: &Topics, number: u64) -> anyhow::Result<()> {
    let i = number as usize;
    let (sku, _) = PRODUCTS[i % PRODUCTS.len()];
    let s = Step {
        checkout_id: format!("co-{number:06}"),
        number,
        sku: sku.into(),
        quantity: 1 + (i / PRODUCTS.len() % 2) as i32,
        amount_cents: 1500 + 100 * (number as i64 % 7),
    };
    let mut tx = checkout.begin().await?;
    sqlx::query(
        "INSERT INTO carts (checkout_id, sku, quantity, amount_cents) VALUES ($1, $2, $3, $4)",
    )
    .bind(&s.checkout_id)
    .bind(&s.sku)
    .bind(s.quantity)
    .bind(s.amount_cents)
    .execute(&mut *tx)
    .await?;
    let e = NewEvent::new("checkout", s.checkout_id.clone(), "checkout.started")
        .topic(&topics.checkout)
        .json_payload(&s)?;
    append(&mut *tx, &e).await?;
    tx.commit().await?;
    Ok(())
}

/// Creates each service's schema (tables, `processed_events`, saga
/// instances) and returns a pool per service, in [`SERVICES`] order, whose
/// `search_path` is its schema, then `public` (the outbox).
pub async fn prepare(base: &PgConnectOptions) -> anyhow::Result<Vec<PgPool>> {
    crate::consumers::services(base, &SERVICES, &SCHEMAS, "public").await
}

/// The saga's consumer and the three services', built, in [`SERVICES`]
/// order, each configuration changed by `tune`.
pub fn consumers(
    broker: &Broker,
    topics: &Topics,
    pools: &[PgPool],
    saga: Checkout,
    faults: Faults,
    tune: impl Fn(&mut consumer_kit::ConsumerConfig),
) -> anyhow::Result<Vec<(&'static str, Consumer)>> {
    let builder = |group: &'static str, topic: &str, pool: &PgPool| {
        broker.consumer_with(group, topic, pool, &tune)
    };
    let inventory = Inventory(topics.clone());
    let payment = Payment(topics.clone(), faults);
    let ordering = Ordering(topics.clone());
    let c = &topics.commands;
    Ok(vec![
        (
            SERVICES[0],
            builder(SERVICES[0], &topics.checkout, &pools[0])
                .saga(saga)
                .build()?,
        ),
        (
            SERVICES[1],
            // One transaction per command: a batch would hold several
            // products' stock rows at once, and batches of other
            // partitions lock them in another order (deadlocks, each a
            // second's wait).
            broker
                .consumer_with(SERVICES[1], c, &pools[1], |cfg| {
                    tune(cfg);
                    cfg.max_batch = 1;
                })
                .handler("stock.reserve", inventory.clone())
                .handler("stock.confirm", inventory.clone())
                .handler("stock.release", inventory)
                .build()?,
        ),
        (
            SERVICES[2],
            builder(SERVICES[2], c, &pools[2])
                .handler("payment.charge", payment.clone())
                .handler("payment.refund", payment)
                .build()?,
        ),
        (
            SERVICES[3],
            builder(SERVICES[3], c, &pools[3])
                .handler("order.create", ordering.clone())
                .handler("order.cancel", ordering)
                .build()?,
        ),
    ])
}

/// The invariants at the end of a run, over the services' schemas (in
/// [`SERVICES`] order): every failed check, as a sentence. Empty when all
/// hold.
pub async fn check(pools: &[PgPool]) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let q = |pool: &PgPool, sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let running = q(
        &pools[0],
        "SELECT count(*) FROM consumer_kit_sagas WHERE status = 'running'",
    )
    .await?;
    if running > 0 {
        problems.push(format!("{running} checkouts are not in a terminal state"));
    }
    let open = q(
        &pools[1],
        "SELECT count(*) FROM reservations WHERE status = 'reserved'",
    )
    .await?;
    if open > 0 {
        problems.push(format!(
            "{open} reservations are neither confirmed nor released"
        ));
    }
    let unbalanced = q(
        &pools[1],
        "SELECT count(*) FROM stock s WHERE s.available + s.reserved + s.confirmed <> s.initial \
           OR s.reserved <> 0 \
           OR s.confirmed <> (SELECT coalesce(sum(quantity), 0) FROM reservations r \
                              WHERE r.sku = s.sku AND r.status = 'confirmed')",
    )
    .await?;
    if unbalanced > 0 {
        problems.push(format!("{unbalanced} products' stock does not balance"));
    }
    // A charge stands only with an order; else it was refunded.
    let charged: Vec<String> =
        sqlx::query_scalar("SELECT checkout_id FROM payments WHERE status = 'charged'")
            .fetch_all(&pools[2])
            .await?;
    let ordered: Vec<String> =
        sqlx::query_scalar("SELECT checkout_id FROM orders WHERE status = 'created'")
            .fetch_all(&pools[3])
            .await?;
    let orphans = charged.iter().filter(|c| !ordered.contains(c)).count();
    if orphans > 0 {
        problems.push(format!(
            "{orphans} payments were charged without an order or a refund"
        ));
    }
    let completed: Vec<String> = sqlx::query_scalar(
        "SELECT instance_id FROM consumer_kit_sagas WHERE status = 'completed' ORDER BY 1",
    )
    .fetch_all(&pools[0])
    .await?;
    let mut standing = ordered.clone();
    standing.sort();
    if completed != standing {
        problems.push(format!(
            "{} checkouts completed but {} orders stand",
            completed.len(),
            standing.len()
        ));
    }
    let uncleared = q(
        &pools[0],
        "SELECT count(*) FROM consumer_kit_sagas s JOIN carts c ON c.checkout_id = s.instance_id \
         WHERE s.status = 'completed' AND NOT c.cleared",
    )
    .await?;
    if uncleared > 0 {
        problems.push(format!("{uncleared} completed checkouts kept their cart"));
    }
    for (name, pool) in SERVICES.iter().zip(pools) {
        let twice = q(
            pool,
            "SELECT count(*) FROM (SELECT event_id FROM effects GROUP BY event_id HAVING count(*) > 1) d",
        )
        .await?;
        if twice > 0 {
            problems.push(format!("{name}: {twice} events applied twice"));
        }
    }
    Ok(problems)
}
