//! Kafka topic name rules, shared by producers (early validation) and the
//! relay (routing).

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Checks a topic name against Kafka's rules: 1 to 249 characters from
/// `[a-zA-Z0-9._-]`, and not `.` or `..`.
///
/// Returns a reason suitable for an error message when the name is invalid.
pub fn validate_topic(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic name is {} characters long; Kafka allows at most {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is not allowed by Kafka"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {bad:?}; Kafka allows only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_legal_names() {
        assert!(validate_topic("orders.events").is_ok());
        assert!(validate_topic("a_b-c.9").is_ok());
        assert!(validate_topic(&"x".repeat(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn rejects_illegal_names() {
        assert!(validate_topic("").is_err());
        assert!(validate_topic(".").is_err());
        assert!(validate_topic("..").is_err());
        assert!(validate_topic("has space").is_err());
        assert!(validate_topic("slash/topic").is_err());
        assert!(validate_topic(&"x".repeat(MAX_TOPIC_LEN + 1)).is_err());
    }
}
