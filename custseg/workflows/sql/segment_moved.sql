-- Customers in both snapshots whose segment changed, with their earlier features (to re-score them).
SELECT a.customer_id, a.segment AS from_segment, b.segment AS to_segment, a.* EXCLUDE (customer_id, segment)
FROM earlier AS a
JOIN later AS b ON a.customer_id = b.customer_id
WHERE a.segment <> b.segment
