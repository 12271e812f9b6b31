ALTER TABLE local_site RENAME COLUMN suggested_communities TO suggested_multi_community_id;

