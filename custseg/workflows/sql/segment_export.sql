-- One row per customer present on either date: previous and current segment, the date of the change
-- (the later date when the segment differs, entered and left included; NULL when unchanged).
SELECT
    coalesce(b.customer_id, a.customer_id) AS customer_id,
    a.segment AS previous_segment,
    b.segment AS segment,
    CASE WHEN a.segment IS DISTINCT FROM b.segment THEN $to_date END AS changed_on,
    coalesce(b.model_version, a.model_version) AS model_version
    {reasons}
FROM earlier AS a
FULL OUTER JOIN later AS b ON a.customer_id = b.customer_id
WHERE NOT $changed_only OR a.segment IS DISTINCT FROM b.segment
ORDER BY customer_id
