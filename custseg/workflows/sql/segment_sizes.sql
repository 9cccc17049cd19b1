-- Count and share per segment per date, with the change from the previous date in the selection.
-- Segments absent on a date count 0 there (the dates x segments grid), so every change is defined.
WITH counts AS (
    SELECT date, segment, count(*) AS n FROM snapshots GROUP BY ALL
), grid AS (
    SELECT d.date, s.segment, coalesce(c.n, 0) AS n
    FROM (SELECT DISTINCT date FROM counts) AS d
    CROSS JOIN (SELECT DISTINCT segment FROM counts) AS s
    LEFT JOIN counts AS c ON c.date = d.date AND c.segment = s.segment
), shared AS (
    SELECT date, segment, n, n / sum(n) OVER (PARTITION BY date) AS share FROM grid
)
SELECT
    date,
    segment,
    n AS count,
    share,
    n - lag(n) OVER (PARTITION BY segment ORDER BY date) AS count_change,
    share - lag(share) OVER (PARTITION BY segment ORDER BY date) AS share_change
FROM shared
ORDER BY date, segment
