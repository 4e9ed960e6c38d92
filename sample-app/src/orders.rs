//! The order service: an HTTP API whose every change writes the order row
//! and its event in **one transaction** (`outbox_core::append`).
//!
//! | method | path | does | event |
//! |---|---|---|---|
//! | `POST` | `/orders` | create (`{"customer", "sku", "quantity", "amount_cents"}`) | `order.created` |
//! | `POST` | `/orders/{id}/pay` | created → paid | `order.paid` |
//! | `POST` | `/orders/{id}/ship` | paid → shipped | `order.shipped` |
//! | `POST` | `/orders/{id}/cancel` | created or paid → cancelled | `order.cancelled` |
//! | `GET` | `/orders/{id}` | one order | |
//! | `GET` | `/orders` | the latest 100 orders | |
//!
//! Errors are JSON (`{"error": "..."}`): 400 for malformed JSON, 422 for
//! invalid fields, 404 for an unknown order, 409 for a transition the
//! order's status does not allow, 500 (without details) for database errors.

use axum::{
    extract::{rejection::JsonRejection, Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use outbox_core::{append, NewEvent};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The service's state: its database and the topic its events go to (the
/// record key is the order id).
#[derive(Debug, Clone)]
pub struct Orders {
    /// The service's database, with the outbox.
    pub pool: PgPool,
    /// The topic of every order event.
    pub topic: std::sync::Arc<str>,
}

/// The service's own table, next to the outbox.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer     text   NOT NULL,
    sku          text   NOT NULL,
    quantity     integer NOT NULL CHECK (quantity > 0),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    status       text   NOT NULL DEFAULT 'created',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
)";

/// A new order, as posted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewOrder {
    /// The customer's e-mail address.
    pub customer: String,
    /// The product.
    pub sku: String,
    /// How many, at least 1.
    pub quantity: i32,
    /// Total price in cents, not negative.
    pub amount_cents: i64,
}

/// An order, as stored and returned.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Order {
    /// Id.
    pub id: i64,
    /// Customer e-mail.
    pub customer: String,
    /// Product.
    pub sku: String,
    /// Quantity.
    pub quantity: i32,
    /// Price in cents.
    pub amount_cents: i64,
    /// `created`, `paid`, `shipped` or `cancelled`.
    pub status: String,
}

/// The payload of every order event: the order after the change.
pub type OrderEvent = Order;

/// An API error, rendered as `{"error": "..."}` with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not the JSON expected.
    #[error("{0}")]
    BadRequest(String),
    /// 422: a field is invalid.
    #[error("{0}")]
    Invalid(String),
    /// 404.
    #[error("order {0} does not exist")]
    NotFound(i64),
    /// 409: the order's status does not allow this.
    #[error("order {id} is {status}; cannot {action} it")]
    Conflict {
        /// Order id.
        id: i64,
        /// Its status.
        status: String,
        /// What was asked.
        action: &'static str,
    },
    /// 500: logged, not shown.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<outbox_core::AppendError> for ApiError {
    fn from(e: outbox_core::AppendError) -> Self {
        ApiError::Internal(e.into())
    }
}

/// The HTTP routes of the service.
pub fn router(state: Orders) -> Router {
    Router::new()
        .route("/orders", post(create).get(list))
        .route("/orders/{id}", get(show))
        .route("/orders/{id}/pay", post(pay))
        .route("/orders/{id}/ship", post(ship))
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Orders,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn event(topic: &str, order: &Order, event_type: &str) -> Result<NewEvent, ApiError> {
    Ok(NewEvent::new("order", order.id.to_string(), event_type)
        .topic(topic)
        .source("sample-app/orders")
        .correlation_id(format!("order-{}", order.id))
        .json_payload(order)?)
}

async fn create(
    State(Orders { pool, topic }): State<Orders>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let Json(new) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !new.customer.contains('@') {
        return Err(ApiError::Invalid(
            "customer must be an e-mail address".into(),
        ));
    }
    if new.sku.trim().is_empty() {
        return Err(ApiError::Invalid("sku must not be empty".into()));
    }
    if new.quantity < 1 {
        return Err(ApiError::Invalid("quantity must be at least 1".into()));
    }
    if new.amount_cents < 0 {
        return Err(ApiError::Invalid(
            "amount_cents must not be negative".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    let order: Order = sqlx::query_as(
        "INSERT INTO orders (customer, sku, quantity, amount_cents) VALUES ($1, $2, $3, $4) \
         RETURNING id, customer, sku, quantity, amount_cents, status",
    )
    .bind(&new.customer)
    .bind(&new.sku)
    .bind(new.quantity)
    .bind(new.amount_cents)
    .fetch_one(&mut *tx)
    .await?;
    append(&mut *tx, &event(&topic, &order, "order.created")?).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(order)))
}

/// Moves an order from one of `from` to `to`, with its event, in one
/// transaction. The row lock orders the events of one order.
async fn transition(
    Orders { pool, topic }: &Orders,
    id: i64,
    from: &[&str],
    to: &str,
    action: &'static str,
) -> Result<Json<Order>, ApiError> {
    let mut tx = pool.begin().await?;
    let current: Option<Order> = sqlx::query_as(
        "SELECT id, customer, sku, quantity, amount_cents, status FROM orders WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let current = current.ok_or(ApiError::NotFound(id))?;
    if !from.contains(&current.status.as_str()) {
        return Err(ApiError::Conflict {
            id,
            status: current.status,
            action,
        });
    }
    let order: Order = sqlx::query_as(
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1 \
         RETURNING id, customer, sku, quantity, amount_cents, status",
    )
    .bind(id)
    .bind(to)
    .fetch_one(&mut *tx)
    .await?;
    append(&mut *tx, &event(topic, &order, &format!("order.{to}"))?).await?;
    tx.commit().await?;
    Ok(Json(order))
}

async fn pay(State(s): State<Orders>, Path(id): Path<i64>) -> Result<Json<Order>, ApiError> {
    transition(&s, id, &["created"], "paid", "pay").await
}

async fn ship(State(s): State<Orders>, Path(id): Path<i64>) -> Result<Json<Order>, ApiError> {
    transition(&s, id, &["paid"], "shipped", "ship").await
}

async fn cancel(State(s): State<Orders>, Path(id): Path<i64>) -> Result<Json<Order>, ApiError> {
    transition(&s, id, &["created", "paid"], "cancelled", "cancel").await
}

async fn show(
    State(Orders { pool, .. }): State<Orders>,
    Path(id): Path<i64>,
) -> Result<Json<Order>, ApiError> {
    let order: Option<Order> = sqlx::query_as(
        "SELECT id, customer, sku, quantity, amount_cents, status FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&pool)
    .await?;
    order.map(Json).ok_or(ApiError::NotFound(id))
}

async fn list(State(Orders { pool, .. }): State<Orders>) -> Result<Json<Vec<Order>>, ApiError> {
    Ok(Json(
        sqlx::query_as(
            "SELECT id, customer, sku, quantity, amount_cents, status FROM orders ORDER BY id DESC LIMIT 100",
        )
        .fetch_all(&pool)
        .await?,
    ))
}
