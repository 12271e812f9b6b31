//! The rule catalogue: one constant per rule, with its stable id, name,
//! family, severity, why it is dangerous and the safe way. Ids never change
//! meaning; new rules take new ids.

use super::{Family, Rule, Severity};

macro_rules! rules {
    ($($konst:ident = $id:literal $name:literal $family:ident $sev:ident $incompat:literal, $why:literal, $fix:literal;)*) => {
        $(pub const $konst: Rule = Rule {
            id: $id, name: $name, family: Family::$family, severity: Severity::$sev,
            incompatible: $incompat, why: $why, fix: $fix,
        };)*
        /// Every rule, in id order.
        pub const RULES: &[Rule] = &[$($konst),*];
    };
}

rules! {
    BAD_SUPPRESSION = "BS002" "bad-suppression" Opaque Warning false,
        "a backstop:ignore comment must name known rules and give a reason: this one is not applied",
        "write `-- backstop:ignore BS301 <why this is safe here>` on the line above the statement";
    DROP_TABLE = "BS101" "drop-table" Destructive Error true,
        "drops the table and all its rows; the running app still reads it",
        "stop using the table in a released app version, then drop it in a contract migration with an approval";
    DROP_COLUMN = "BS102" "drop-column" Destructive Error true,
        "drops the column and its data; the running app still reads or writes it",
        "stop using the column in a released app version, then drop it in a contract migration with an approval";
    DROP_SCHEMA = "BS103" "drop-schema" Destructive Error true,
        "drops the schema and everything in it",
        "drop the objects one by one in a contract migration with an approval";
    DROP_INDEX = "BS104" "drop-index" Destructive Warning false,
        "queries that use the index get slow at once",
        "make sure no query plan needs the index; use DROP INDEX CONCURRENTLY";
    DROP_VIEW = "BS105" "drop-view" Destructive Error true,
        "the running app may still query the view",
        "drop it in a contract migration after the app stopped using it";
    DROP_TYPE = "BS106" "drop-type" Destructive Error true,
        "columns or functions using the type break",
        "drop it in a contract migration after nothing uses it";
    DROP_SEQUENCE = "BS107" "drop-sequence" Destructive Error true,
        "defaults using the sequence fail",
        "drop it in a contract migration after nothing uses it";
    TRUNCATE = "BS108" "truncate" Destructive Error false,
        "deletes every row (CASCADE also empties referencing tables)",
        "delete in batches with a WHERE clause, or truncate in a contract migration with an approval";
    DELETE_ALL = "BS109" "delete-without-where" Destructive Error false,
        "DELETE without WHERE removes every row",
        "add a WHERE clause that names the rows to remove";
    UPDATE_ALL = "BS110" "update-without-where" Destructive Warning false,
        "UPDATE without WHERE rewrites every row and overwrites their values",
        "add a WHERE clause (e.g. WHERE col IS NULL for a backfill) and batch large tables";
    ALTER_COLUMN_TYPE = "BS111" "alter-column-type" Destructive Error true,
        "changes a column's type in place: values may be converted or lost and the running app sees a new type",
        "add a new column, backfill it, switch the app, then drop the old one (expand/contract)";
    RENAME = "BS112" "rename" Destructive Error true,
        "the running app still uses the old name",
        "add the new object (or a view/column under the new name), switch the app, then drop the old one";
    DROP_DATABASE = "BS113" "drop-database" Destructive Error true,
        "drops a whole database",
        "never from a migration; do it by hand with a fresh backup";
    DROP_FUNCTION = "BS114" "drop-function" Destructive Error true,
        "the running app, a view, a default or a trigger may still call the function or procedure",
        "stop calling it in a released app version, then drop it in a contract migration (or CREATE OR REPLACE it in place)";
    DROP_TRIGGER = "BS115" "drop-trigger" Destructive Error false,
        "what the trigger did (audit rows, derived columns, checks) stops at once for every writer",
        "drop it in a contract migration with an approval, or CREATE OR REPLACE TRIGGER (PostgreSQL 14+)";
    DROP_POLICY = "BS116" "drop-policy" Destructive Error false,
        "row-level security changes at once: rows the policy let through disappear for some roles, or rows it hid appear",
        "create the replacement policy first, then drop the old one in a contract migration with an approval";
    SET_NOT_NULL = "BS201" "set-not-null" Incompatible Error true,
        "the running app may still write NULLs; the check also scans the table under an exclusive lock",
        "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET NOT NULL (PostgreSQL 12+ uses the valid check)";
    ADD_REQUIRED_COLUMN = "BS202" "add-required-column" Incompatible Error true,
        "a NOT NULL column without a default makes the running app's INSERTs fail (and fails on a non-empty table)",
        "add the column nullable or with a DEFAULT, backfill, then set NOT NULL in a later migration";
    ENUM_VALUE_RENAME = "BS203" "enum-value-rename" Incompatible Error true,
        "the running app still writes the old value",
        "add the new value, migrate rows and the app, and stop writing the old value";
    DROP_DEFAULT = "BS204" "drop-default" Incompatible Warning true,
        "the running app may insert without naming the column and rely on the default: its rows get NULL, or fail when the column is NOT NULL",
        "stop relying on the default in a released app version, then drop it in a contract migration";
    DROP_CONSTRAINT = "BS205" "drop-constraint" Incompatible Warning true,
        "the running app may rely on the constraint: INSERT ... ON CONFLICT needs its unique index, and without it nothing stops the rows it kept out",
        "drop it in a contract migration after the app stopped relying on it";
    CREATE_INDEX_LOCK = "BS301" "create-index-not-concurrently" Locking Error false,
        "CREATE INDEX blocks writes to the table while it builds",
        "use CREATE INDEX CONCURRENTLY (it runs outside a transaction)";
    DROP_INDEX_LOCK = "BS302" "drop-index-not-concurrently" Locking Warning false,
        "DROP INDEX takes an ACCESS EXCLUSIVE lock on the table",
        "use DROP INDEX CONCURRENTLY";
    REINDEX_LOCK = "BS303" "reindex-not-concurrently" Locking Error false,
        "REINDEX blocks writes (and reads that use the index) while it runs",
        "use REINDEX ... CONCURRENTLY (PostgreSQL 12+)";
    FK_VALIDATE = "BS304" "add-foreign-key-validating" Locking Error false,
        "adding a validated foreign key scans the table while blocking writes on both tables",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate migration";
    CHECK_VALIDATE = "BS305" "add-check-validating" Locking Error false,
        "adding a validated CHECK scans the table under an ACCESS EXCLUSIVE lock",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate migration";
    UNIQUE_INDEXLESS = "BS306" "add-unique-without-index" Locking Error false,
        "adding a UNIQUE constraint builds its index under an ACCESS EXCLUSIVE lock",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX";
    PRIMARY_INDEXLESS = "BS307" "add-primary-key-without-index" Locking Error false,
        "adding a PRIMARY KEY builds its index under an ACCESS EXCLUSIVE lock",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... PRIMARY KEY USING INDEX";
    VOLATILE_DEFAULT = "BS308" "volatile-default" Locking Error false,
        "a DEFAULT calling a volatile function (random(), clock_timestamp(), gen_random_uuid(), nextval(), or one backstop does not know to be immutable or stable) rewrites the whole table",
        "add the column without a default, set the default, and backfill in batches";
    DEFAULT_REWRITE = "BS309" "add-column-default-rewrite" Locking Error false,
        "before PostgreSQL 11, ADD COLUMN with any DEFAULT rewrites the whole table",
        "add the column without a default, set the default, and backfill in batches";
    TYPE_REWRITE = "BS310" "alter-type-rewrite" Locking Error false,
        "ALTER COLUMN TYPE usually rewrites the table and its indexes under an ACCESS EXCLUSIVE lock",
        "add a new column and backfill it in batches";
    VACUUM_FULL = "BS311" "vacuum-full" Locking Error false,
        "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock",
        "use plain VACUUM, or pg_repack outside the migration";
    CLUSTER = "BS312" "cluster" Locking Error false,
        "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock",
        "use pg_repack outside the migration";
    LOCK_TIMEOUT = "BS313" "lock-without-timeout" Locking Warning false,
        "the statement waits for an exclusive lock (a foreign key also locks the table it references) with no lock_timeout and queues every query behind it",
        "SET lock_timeout = '5s' at the start of the migration (and retry on timeout)";
    GENERATED_COLUMN = "BS314" "add-stored-generated-column" Locking Error false,
        "a STORED generated column is computed for every row: the whole table is rewritten under an ACCESS EXCLUSIVE lock",
        "add a plain nullable column, fill it with a trigger for new rows and a batched backfill for old ones";
    IDENTITY_COLUMN = "BS315" "add-identity-column" Locking Error false,
        "an identity or serial column gets a value for every existing row: the whole table is rewritten under an ACCESS EXCLUSIVE lock",
        "add a nullable column, attach a sequence as its default, backfill in batches, then SET NOT NULL";
    VALIDATE_SAME_TRANSACTION = "BS316" "validate-in-adding-transaction" Locking Error false,
        "the constraint is validated in the transaction that added it NOT VALID, so the scan runs under ADD CONSTRAINT's ACCESS EXCLUSIVE lock",
        "VALIDATE CONSTRAINT in a later migration (it then takes only a SHARE UPDATE EXCLUSIVE lock)";
    DETACH_PARTITION = "BS317" "detach-partition-blocking" Locking Error false,
        "DETACH PARTITION takes an ACCESS EXCLUSIVE lock on the partitioned table: every query on it waits",
        "use DETACH PARTITION ... CONCURRENTLY (PostgreSQL 14+, outside a transaction)";
    DOMAIN_CONSTRAINT = "BS318" "add-domain-constraint-validating" Locking Error false,
        "ALTER DOMAIN ... ADD CONSTRAINT checks every column of the domain's type in every table, under locks",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a later migration";
    REFRESH_MATVIEW = "BS319" "refresh-materialized-view-blocking" Locking Error false,
        "REFRESH MATERIALIZED VIEW without CONCURRENTLY blocks every read of the view until it finishes",
        "REFRESH MATERIALIZED VIEW CONCURRENTLY (needs a unique index on the view)";
    NON_TRANSACTIONAL = "BS401" "non-transactional" Transaction Warning false,
        "cannot run in a transaction: the migration runs statement by statement and a failure restores the checkpoint",
        "keep non-transactional statements in a migration of their own";
    TRANSACTION_CONTROL = "BS402" "transaction-control" Transaction Error false,
        "BEGIN/COMMIT/ROLLBACK inside a migration break backstop's transaction handling",
        "remove them: backstop runs the statements in one transaction when it can";
    DO_BLOCK = "BS501" "do-block" Opaque Warning false,
        "a DO block is code the analysis cannot see into",
        "review it by hand, or write the statements out";
    FUNCTION_BODY = "BS502" "function-body" Opaque Warning false,
        "a function or procedure body is code the analysis cannot see into",
        "review the body by hand";
}
