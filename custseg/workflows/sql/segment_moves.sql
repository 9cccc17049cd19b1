-- Migration cells between two snapshots: (from, to) with NULL on the side where the customer is absent
-- (entered: no earlier row; left: no later row). total_spent at stake: the later value, else the earlier.
SELECT
    a.segment AS from_segment,
    b.segment AS to_segment,
    count(*) AS n,
    round(sum(coalesce(b.total_spent, a.total_spent)), 2) AS total_spent
FROM earlier AS a
FULL OUTER JOIN later AS b ON a.customer_id = b.customer_id
GROUP BY ALL
