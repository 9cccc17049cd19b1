-- One row per customer present on either date: previous and current segment, and the date of the change:
-- the first snapshot date after --from from which the customer stayed in its --to segment (entered and
-- left included; snapshots recorded in between are looked at); NULL when unchanged.
WITH pairs AS (
    SELECT
        coalesce(b.customer_id, a.customer_id) AS customer_id,
        a.segment AS previous_segment,
        b.segment AS segment,
        coalesce(b.model_version, a.model_version) AS model_version
        {reasons}
    FROM earlier AS a
    FULL OUTER JOIN later AS b ON a.customer_id = b.customer_id
    WHERE NOT $changed_only OR a.segment IS DISTINCT FROM b.segment
),
days AS (SELECT DISTINCT date FROM between),
changed AS (SELECT customer_id, segment FROM pairs WHERE previous_segment IS DISTINCT FROM segment),
last_other AS (
    -- the last date on which a changed customer was not yet in its final state (absent counts as a state)
    SELECT c.customer_id, max(d.date) AS day
    FROM changed AS c
    CROSS JOIN days AS d
    LEFT JOIN between AS s ON s.customer_id = c.customer_id AND s.date = d.date
    WHERE s.segment IS DISTINCT FROM c.segment
    GROUP BY c.customer_id
),
change_day AS (
    SELECT c.customer_id, min(d.date) AS day
    FROM changed AS c
    CROSS JOIN days AS d
    LEFT JOIN last_other AS l ON l.customer_id = c.customer_id
    WHERE d.date > coalesce(l.day, CAST($from_date AS DATE))
    GROUP BY c.customer_id
)
SELECT
    p.customer_id,
    p.previous_segment,
    p.segment,
    strftime(w.day, '%Y-%m-%d') AS changed_on,
    p.model_version
    {reason_columns}
FROM pairs AS p
LEFT JOIN change_day AS w ON w.customer_id = p.customer_id
ORDER BY p.customer_id
