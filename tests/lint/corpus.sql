-- Lint corpus: each case is one migration; `expect` lists exactly the rule ids found.
-- A `-- pg: N` line sets the target PostgreSQL version (default 15).

-- case: drop table
-- expect: BS101
SET lock_timeout = '5s';
DROP TABLE orders;

-- case: create table is safe
-- expect: none
CREATE TABLE audit (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());

-- case: drop column
-- expect: BS102
SET lock_timeout = '5s';
ALTER TABLE orders DROP COLUMN note;

-- case: add nullable column is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN note text;

-- case: drop schema
-- expect: BS103
SET lock_timeout = '5s';
DROP SCHEMA legacy CASCADE;

-- case: drop index concurrently
-- expect: BS104,BS401
DROP INDEX CONCURRENTLY orders_customer;

-- case: drop index blocking
-- expect: BS104,BS302
SET lock_timeout = '5s';
DROP INDEX orders_customer;

-- case: drop view
-- expect: BS105
SET lock_timeout = '5s';
DROP VIEW order_totals;

-- case: drop materialized view
-- expect: BS105
SET lock_timeout = '5s';
DROP MATERIALIZED VIEW order_stats;

-- case: create view is safe
-- expect: none
CREATE VIEW order_totals AS SELECT customer, count(*) FROM orders GROUP BY customer;

-- case: drop type
-- expect: BS106
SET lock_timeout = '5s';
DROP TYPE order_status;

-- case: drop domain
-- expect: BS106
SET lock_timeout = '5s';
DROP DOMAIN email;

-- case: create type is safe
-- expect: none
CREATE TYPE order_status AS ENUM ('new', 'paid');

-- case: drop sequence
-- expect: BS107
SET lock_timeout = '5s';
DROP SEQUENCE invoice_numbers;

-- case: create sequence is safe
-- expect: none
CREATE SEQUENCE invoice_numbers;

-- case: truncate
-- expect: BS108
SET lock_timeout = '5s';
TRUNCATE orders;

-- case: truncate cascade
-- expect: BS108
SET lock_timeout = '5s';
TRUNCATE customers CASCADE;

-- case: delete without where
-- expect: BS109
DELETE FROM orders;

-- case: delete with where is safe
-- expect: none
DELETE FROM orders WHERE created_at < now() - interval '7 years';

-- case: update without where
-- expect: BS110
UPDATE orders SET total = qty * price;

-- case: backfill with where is safe
-- expect: none
UPDATE orders SET total = qty * price WHERE total IS NULL;

-- case: alter column type
-- expect: BS111,BS310
SET lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN qty TYPE bigint;

-- case: alter column type on a new table
-- expect: none
CREATE TABLE staging (id int);
ALTER TABLE staging ALTER COLUMN id TYPE bigint;

-- case: add column and backfill instead of type change
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN qty_big bigint;
UPDATE orders SET qty_big = qty WHERE qty_big IS NULL;

-- case: rename table
-- expect: BS112
SET lock_timeout = '5s';
ALTER TABLE orders RENAME TO purchases;

-- case: rename column
-- expect: BS112
SET lock_timeout = '5s';
ALTER TABLE orders RENAME COLUMN qty TO quantity;

-- case: rename index
-- expect: BS112
SET lock_timeout = '5s';
ALTER INDEX orders_customer RENAME TO orders_by_customer;

-- case: drop database
-- expect: BS113,BS401
DROP DATABASE legacy;

-- case: set not null
-- expect: BS201
SET lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN customer SET NOT NULL;

-- case: not-null check not valid is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT customer_nn CHECK (customer IS NOT NULL) NOT VALID;

-- case: validate constraint is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders VALIDATE CONSTRAINT customer_nn;

-- case: drop not null is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN note DROP NOT NULL;

-- case: add required column
-- expect: BS202
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN region text NOT NULL;

-- case: add not-null column with constant default
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';

-- case: add column with constant default before 11 rewrites
-- expect: BS309
-- pg: 10
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN region text DEFAULT 'eu';

-- case: add column without default before 11 is safe
-- expect: none
-- pg: 10
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN region text;

-- case: rename enum value
-- expect: BS203
ALTER TYPE order_status RENAME VALUE 'paid' TO 'settled';

-- case: add enum value is safe
-- expect: none
ALTER TYPE order_status ADD VALUE 'refunded';

-- case: create index blocking
-- expect: BS301
SET lock_timeout = '5s';
CREATE INDEX orders_customer ON orders (customer);

-- case: create index concurrently
-- expect: BS401
CREATE INDEX CONCURRENTLY orders_customer ON orders (customer);

-- case: create index on a table created in the same migration
-- expect: none
CREATE TABLE notes (id int, body text);
CREATE INDEX notes_id ON notes (id);

-- case: create unique index blocking
-- expect: BS301
SET lock_timeout = '5s';
CREATE UNIQUE INDEX orders_ref ON orders (ref);

-- case: reindex blocking
-- expect: BS303
SET lock_timeout = '5s';
REINDEX INDEX orders_customer;

-- case: reindex concurrently
-- expect: BS401
REINDEX INDEX CONCURRENTLY orders_customer;

-- case: add foreign key validating
-- expect: BS304
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id);

-- case: add foreign key not valid is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;

-- case: add column with foreign key validating
-- expect: BS304
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN customer_id bigint REFERENCES customers (id);

-- case: add check validating
-- expect: BS305
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT qty_positive CHECK (qty > 0);

-- case: add check not valid is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT qty_positive CHECK (qty > 0) NOT VALID;

-- case: add unique building an index
-- expect: BS306
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_ref_key UNIQUE (ref);

-- case: add unique using index is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_ref_key UNIQUE USING INDEX orders_ref;

-- case: add primary key building an index
-- expect: BS307
SET lock_timeout = '5s';
ALTER TABLE events ADD PRIMARY KEY (id);

-- case: add primary key using index is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY USING INDEX events_id;

-- case: constraints on a new table are safe
-- expect: none
CREATE TABLE lines (id int);
ALTER TABLE lines ADD CONSTRAINT lines_pk PRIMARY KEY (id);
ALTER TABLE lines ADD CONSTRAINT lines_id_positive CHECK (id > 0);

-- case: volatile default uuid
-- expect: BS308
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN token uuid DEFAULT gen_random_uuid();

-- case: volatile default random
-- expect: BS308
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN shard int DEFAULT (random() * 16)::int;

-- case: volatile default clock_timestamp
-- expect: BS308
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN seen timestamptz DEFAULT clock_timestamp();

-- case: stable default now() is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN seen timestamptz DEFAULT now();

-- case: vacuum full
-- expect: BS311,BS401
SET lock_timeout = '5s';
VACUUM FULL orders;

-- case: plain vacuum
-- expect: BS401
VACUUM orders;

-- case: analyze is safe
-- expect: none
ANALYZE orders;

-- case: cluster
-- expect: BS312
SET lock_timeout = '5s';
CLUSTER orders USING orders_pkey;

-- case: alter table without lock_timeout
-- expect: BS313
ALTER TABLE orders ADD COLUMN note text;

-- case: lock table without lock_timeout
-- expect: BS313
LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;

-- case: lock table with lock_timeout is safe
-- expect: none
SET lock_timeout = '5s';
LOCK TABLE orders IN SHARE MODE;

-- case: alter system
-- expect: BS401
ALTER SYSTEM SET work_mem = '64MB';

-- case: create database
-- expect: BS401
CREATE DATABASE reporting;

-- case: detach partition concurrently
-- expect: BS401
SET lock_timeout = '5s';
ALTER TABLE measurements DETACH PARTITION measurements_2019 CONCURRENTLY;

-- case: detach partition blocking
-- expect: BS317
SET lock_timeout = '5s';
ALTER TABLE measurements DETACH PARTITION measurements_2019;

-- case: begin inside a migration
-- expect: BS402
BEGIN;
CREATE TABLE x (id int);
COMMIT;

-- case: rollback inside a migration
-- expect: BS402
ROLLBACK;

-- case: do block
-- expect: BS501
DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$;

-- case: create function
-- expect: BS502
CREATE FUNCTION total(q int, p int) RETURNS int LANGUAGE sql AS $$ SELECT q * p $$;

-- case: create procedure
-- expect: BS502
CREATE PROCEDURE purge() LANGUAGE sql AS $$ DELETE FROM orders WHERE false $$;

-- case: plain reads and inserts are safe
-- expect: none
SELECT 1;
INSERT INTO orders (customer, qty) VALUES ('a', 1);

-- case: comments are safe
-- expect: none
COMMENT ON TABLE orders IS 'customer orders';

-- case: grant is safe
-- expect: none
GRANT SELECT ON orders TO reporting;

-- case: vacuum full turned off by its value
-- expect: BS401
VACUUM (FULL false) orders;

-- case: vacuum full turned on by its value
-- expect: BS311,BS401
SET lock_timeout = '5s';
VACUUM (FULL true, ANALYZE) orders;

-- case: reindex concurrently turned off by its value
-- expect: BS303
SET lock_timeout = '5s';
REINDEX (CONCURRENTLY false) INDEX orders_customer;

-- case: reindex concurrently by option value
-- expect: BS401
REINDEX (CONCURRENTLY) INDEX orders_customer;

-- case: create table as builds a new table
-- expect: none
CREATE TABLE order_totals AS SELECT customer_id, sum(total) AS total FROM orders GROUP BY 1;
CREATE INDEX order_totals_customer ON order_totals (customer_id);
ALTER TABLE order_totals ADD CONSTRAINT order_totals_pk PRIMARY KEY (customer_id);

-- case: select into builds a new table
-- expect: none
SELECT id, email INTO users_backup FROM users;
CREATE INDEX users_backup_email ON users_backup (email);

-- case: create table if not exists may create nothing
-- expect: BS301, BS313
CREATE TABLE IF NOT EXISTS orders (id int);
CREATE INDEX orders_created ON orders (created_at);

-- case: a schema-qualified table is not the unqualified one
-- expect: BS301, BS313
CREATE TABLE staging.orders (id int);
CREATE INDEX orders_id ON public.orders (id);

-- case: a schema-qualified new table is new
-- expect: none
CREATE TABLE staging.orders (id int);
CREATE INDEX orders_id ON staging.orders (id);

-- case: search_path decides what an unqualified name is
-- expect: BS301, BS313
CREATE TABLE staging.orders (id int);
SET search_path TO public;
CREATE INDEX orders_id ON orders (id);

-- case: search_path set to the new table's schema
-- expect: none
CREATE TABLE staging.orders (id int);
SET search_path TO staging;
CREATE INDEX orders_id ON orders (id);

-- case: set not null drop column and type change on a new table
-- expect: none
CREATE TABLE invoices (id int, note text, amount int);
ALTER TABLE invoices ALTER COLUMN id SET NOT NULL;
ALTER TABLE invoices DROP COLUMN note;
ALTER TABLE invoices ALTER COLUMN amount TYPE bigint;

-- case: view dropped and recreated is not destructive
-- expect: BS313
DROP VIEW active_users;
CREATE VIEW active_users AS SELECT id, email FROM users WHERE active;

-- case: view dropped and recreated with lock_timeout is safe
-- expect: none
SET lock_timeout = '5s';
DROP VIEW IF EXISTS reporting.active_users;
CREATE OR REPLACE VIEW reporting.active_users AS SELECT id FROM users;

-- case: view dropped with cascade and recreated is destructive
-- expect: BS105
SET lock_timeout = '5s';
DROP VIEW active_users CASCADE;
CREATE VIEW active_users AS SELECT id FROM users;

-- case: one of two dropped views recreated is destructive
-- expect: BS105
SET lock_timeout = '5s';
DROP VIEW a, b;
CREATE VIEW a AS SELECT 1 AS x;

-- case: view dropped and another created is destructive
-- expect: BS105
SET lock_timeout = '5s';
DROP VIEW active_users;
CREATE VIEW active_users_v2 AS SELECT id FROM users;

-- case: function dropped and recreated with the same arguments
-- expect: BS502
SET lock_timeout = '5s';
DROP FUNCTION total(integer);
CREATE FUNCTION total(n int) RETURNS int LANGUAGE sql AS 'SELECT n';

-- case: function dropped and recreated with other arguments
-- expect: BS114, BS502
SET lock_timeout = '5s';
DROP FUNCTION total(integer);
CREATE FUNCTION total(n text) RETURNS int LANGUAGE sql AS 'SELECT 1';

-- case: drop function
-- expect: BS114
SET lock_timeout = '5s';
DROP FUNCTION IF EXISTS order_total(bigint);

-- case: drop procedure
-- expect: BS114
SET lock_timeout = '5s';
DROP PROCEDURE archive_orders();

-- case: drop trigger
-- expect: BS115
SET lock_timeout = '5s';
DROP TRIGGER orders_audit ON orders;

-- case: trigger dropped and recreated
-- expect: none
SET lock_timeout = '5s';
DROP TRIGGER orders_audit ON orders;
CREATE TRIGGER orders_audit AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION audit();

-- case: drop policy
-- expect: BS116
SET lock_timeout = '5s';
DROP POLICY tenant_isolation ON orders;

-- case: policy dropped and recreated
-- expect: none
SET lock_timeout = '5s';
DROP POLICY tenant_isolation ON orders;
CREATE POLICY tenant_isolation ON orders USING (tenant_id = current_setting('app.tenant')::int);

-- case: index dropped and recreated keeps only the lock findings
-- expect: BS301, BS302
SET lock_timeout = '5s';
DROP INDEX orders_ref;
CREATE UNIQUE INDEX orders_ref ON orders (ref, created_at);

-- case: add stored generated column
-- expect: BS314
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN total_cents bigint GENERATED ALWAYS AS (total * 100) STORED;

-- case: generated column on a new table is safe
-- expect: none
CREATE TABLE prices (amount numeric, cents bigint GENERATED ALWAYS AS (amount * 100) STORED);

-- case: add identity column
-- expect: BS315
SET lock_timeout = '5s';
ALTER TABLE events ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;

-- case: add serial column
-- expect: BS315
SET lock_timeout = '5s';
ALTER TABLE events ADD COLUMN seq bigserial;

-- case: default calling an unknown function
-- expect: BS308
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN token text DEFAULT make_token();

-- case: default calling a known stable function
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN created_on date DEFAULT date_trunc('day', now())::date;

-- case: default with a cast and a constant is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN meta jsonb NOT NULL DEFAULT '{}'::jsonb;

-- case: validate in the transaction that added the constraint
-- expect: BS316
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_customer_fk;

-- case: validate after a non-transactional statement runs in its own transaction
-- expect: BS401
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_total_positive CHECK (total > 0) NOT VALID;
CREATE INDEX CONCURRENTLY orders_total ON orders (total);
ALTER TABLE orders VALIDATE CONSTRAINT orders_total_positive;

-- case: validate a constraint an earlier migration added is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders VALIDATE CONSTRAINT orders_customer_fk;

-- case: alter domain add constraint validating
-- expect: BS318
ALTER DOMAIN email ADD CONSTRAINT email_has_at CHECK (VALUE LIKE '%@%');

-- case: alter domain add constraint not valid is safe
-- expect: none
ALTER DOMAIN email ADD CONSTRAINT email_has_at CHECK (VALUE LIKE '%@%') NOT VALID;

-- case: new table with a foreign key locks the referenced table
-- expect: BS313
CREATE TABLE payments (id int, order_id int REFERENCES orders (id));

-- case: new table referencing a new table locks nothing
-- expect: none
CREATE TABLE carts (id int PRIMARY KEY);
CREATE TABLE cart_items (id int, cart_id int REFERENCES carts (id));

-- case: refresh materialized view blocking
-- expect: BS319
SET lock_timeout = '5s';
REFRESH MATERIALIZED VIEW sales_summary;

-- case: refresh materialized view concurrently is safe
-- expect: none
SET lock_timeout = '5s';
REFRESH MATERIALIZED VIEW CONCURRENTLY sales_summary;

-- case: drop default
-- expect: BS204
SET lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN status DROP DEFAULT;

-- case: set default is safe
-- expect: none
SET lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'new';

-- case: drop constraint
-- expect: BS205
SET lock_timeout = '5s';
ALTER TABLE orders DROP CONSTRAINT orders_ref_key;

-- case: drop a constraint the migration added is safe
-- expect: BS305
SET lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_tmp CHECK (total > 0);
ALTER TABLE orders DROP CONSTRAINT orders_tmp;

-- case: suppressed finding with a reason
-- expect: BS301
SET lock_timeout = '5s';
-- backstop:ignore BS301 the table holds 40 rows and only the nightly job writes it
CREATE INDEX countries_code ON countries (code);

-- case: suppression without a reason is not applied
-- expect: BS002, BS301
SET lock_timeout = '5s';
-- backstop:ignore BS301
CREATE INDEX countries_code ON countries (code);

-- case: suppression naming an unknown rule
-- expect: BS002, BS301
SET lock_timeout = '5s';
CREATE INDEX countries_code ON countries (code); -- backstop:ignore BS999 typo

-- case: create trigger on an existing table waits for a lock
-- expect: BS313
CREATE TRIGGER orders_audit AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION audit();

-- case: create policy on a new table locks nothing
-- expect: none
CREATE TABLE notes (id int, tenant int);
CREATE POLICY tenant_notes ON notes USING (tenant = 1);

-- case: search_path with $user resolves to the next schema
-- expect: none
CREATE TABLE staging.orders (id int);
SET search_path = "$user", staging;
CREATE INDEX orders_id ON orders (id);

-- case: view recreated but the migration runs statement by statement
-- expect: BS105, BS401
SET lock_timeout = '5s';
DROP VIEW order_totals;
CREATE VIEW order_totals AS SELECT 1 AS x;
CREATE INDEX CONCURRENTLY orders_x ON orders (x);

-- case: lock_timeout of zero waits forever
-- expect: BS301, BS302, BS313
SET lock_timeout = 0;
DROP INDEX orders_ref;
CREATE UNIQUE INDEX orders_ref ON orders (ref);

-- case: lock_timeout reset waits forever
-- expect: BS313
SET lock_timeout = '5s';
RESET lock_timeout;
ALTER TABLE orders ADD COLUMN note text;

-- case: index recreated without unique may have lost uniqueness
-- expect: BS104, BS301, BS302
SET lock_timeout = '5s';
DROP INDEX orders_email_uniq;
CREATE INDEX orders_email_uniq ON orders (email);

-- case: function dropped without arguments and recreated is destructive
-- expect: BS114, BS502
SET lock_timeout = '5s';
DROP FUNCTION calc_total;
CREATE FUNCTION calc_total(o bigint) RETURNS int LANGUAGE sql AS 'SELECT 1';

-- case: volatile default inside an array constructor
-- expect: BS308
SET lock_timeout = '5s';
ALTER TABLE orders ADD COLUMN ids uuid[] DEFAULT ARRAY[gen_random_uuid()];

-- case: partition of a live table locks it
-- expect: BS313
CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');

-- case: suppression of a rule the statement does not trigger
-- expect: BS002, BS401
SET lock_timeout = '5s';
-- backstop:ignore BS301 stale
CREATE INDEX CONCURRENTLY countries_code ON countries (code);

-- case: foreign key from a table filled by create table as to a live table
-- expect: BS304, BS313
CREATE TABLE order_copy AS SELECT * FROM orders;
ALTER TABLE order_copy ADD CONSTRAINT order_copy_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id);

-- case: foreign key not valid from a filled table is safe but waits
-- expect: BS313
CREATE TABLE order_copy AS SELECT * FROM orders;
ALTER TABLE order_copy ADD CONSTRAINT order_copy_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
