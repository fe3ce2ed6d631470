//! sepdist data pipeline.
