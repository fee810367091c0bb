//! placeholder: the durable log (being written)
