"""Step E: average precision under each protocol, the HTML report and its charts."""
